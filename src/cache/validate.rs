//! Validation of a document before it is stored: the body must parse as JSON, and values
//! at configured JSON pointers must equal a template (`{lote_id}`) or be one of a list.
//!
//! The document is parsed as it streams in, by a push parser fed chunk by chunk on the fill's
//! own task (no thread, no channel: feeding never blocks). It accepts exactly what
//! `serde_json::from_slice::<Value>` accepts, and materializes only the asserted values
//! (everything else is checked and dropped byte by byte), so memory stays flat whatever the
//! document's size.

use serde_json::Value;
use std::{
    collections::BTreeMap,
    io,
    sync::{Arc, OnceLock},
};

/// A route's validation rules.
#[derive(Debug, Clone, Default)]
pub struct Validation {
    /// The body must be one well-formed JSON value.
    pub json: bool,
    pub asserts: Vec<Assertion>,
}

impl Validation {
    pub fn is_active(&self) -> bool {
        self.json || !self.asserts.is_empty()
    }
}

/// One check on the values at a pointer.
#[derive(Debug, Clone)]
pub struct Assertion {
    /// As written, e.g. `/archivos_procesados/*/lote_id`.
    pub pointer: String,
    pub segments: Vec<Segment>,
    pub check: Check,
    /// When true, a missing value passes; when false, it fails.
    pub optional: bool,
    pub on_fail: OnFail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    /// `*`: every item of an array.
    Each,
}

#[derive(Debug, Clone)]
pub enum Check {
    /// Equals this template; `{lote_id}` is replaced by the requested id.
    Equals(String),
    OneOf(Vec<String>),
}

/// What a failed assertion does to the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFail {
    /// The document is wrong: abort the response (a wrong batch is worse than an error).
    Abort,
    /// Serve it as the origin sent it, but do not store it (e.g. a batch still processing).
    DontStore,
}

/// Parses a pointer like `/a/*/b` (RFC 6901 escapes `~0`, `~1`; `*` = every array item).
pub fn parse_pointer(p: &str) -> Result<Vec<Segment>, String> {
    let rest = p.strip_prefix('/').ok_or_else(|| format!("{p:?} must start with '/'"))?;
    rest.split('/')
        .map(|s| match s {
            "*" => Ok(Segment::Each),
            "" => Err(format!("{p:?} has an empty segment")),
            s => Ok(Segment::Key(s.replace("~1", "/").replace("~0", "~"))),
        })
        .collect()
}

/// The outcome of validating one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Invalid {
        /// A Cache-Status `detail` token: `invalid-json` or `validation:<pointer>`.
        token: String,
        /// For logs and error bodies.
        reason: String,
        on_fail: OnFail,
    },
}

/// Validates a whole document held in memory (used by tests and tools).
pub fn validate_slice(v: &Validation, lote_id: &str, body: &[u8]) -> Verdict {
    let mut p = Parser::new(v, lote_id);
    p.feed(body);
    p.finish()
}

/// Validates a document read from `reader` (blocking reads; the parsing itself is the push
/// parser's, so the verdicts are those of [`StreamingValidator`]).
pub fn validate_reader(v: &Validation, lote_id: &str, mut reader: impl io::Read) -> Verdict {
    let mut p = Parser::new(v, lote_id);
    let mut buf = vec![0; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => p.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return invalid_json(format!("the body could not be read: {e}")),
        }
    }
    p.finish()
}

fn invalid_json(reason: String) -> Verdict {
    Verdict::Invalid { token: "invalid-json".into(), reason, on_fail: OnFail::Abort }
}

/// `validation:<pointer>` with any character a structured-field token cannot hold replaced.
fn detail_token(pointer: &str) -> String {
    let clean: String = pointer
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(c) { c } else { '_' })
        .collect();
    format!("validation:{clean}")
}

/// Validation running beside a fill: chunks go in as they arrive, the verdict comes out.
///
/// Push-based: each chunk is parsed inline by [`StreamingValidator::feed`], which never blocks
/// and holds no thread; the state kept between chunks is the container stack (at most 127
/// frames), a key being matched against the asserted pointers, and the value at an asserted
/// pointer while it is read. Once the document is known to be malformed, feeding is a no-op.
pub struct StreamingValidator {
    parser: Parser<Arc<Validation>, String>,
}

impl StreamingValidator {
    pub fn new(v: Arc<Validation>, lote_id: String) -> Self {
        StreamingValidator { parser: Parser::new(v, lote_id) }
    }

    /// Parses the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.parser.feed(chunk);
    }

    /// Signals the end of the body and gives the verdict.
    pub fn finish(self) -> Verdict {
        self.parser.finish()
    }
}

/// serde_json's recursion limit: its deserializer starts with 128 levels and fails when the
/// count reaches zero, so a document may nest at most 127 arrays/objects. Deeper documents are
/// rejected here too, so that "valid" means what `serde_json::from_slice::<Value>` says.
const MAX_DEPTH: usize = 127;

/// The pointers as a tree (nodes by index, the root at 0), so one pass over the document
/// evaluates all of them.
#[derive(Default, Debug)]
struct Node {
    /// By key, in key order.
    children: Vec<(String, usize)>,
    each: Option<usize>,
    /// Assertions whose pointer ends here.
    leaves: Vec<usize>,
    /// Every assertion at or below this node.
    below: Vec<usize>,
    /// The longest key in `children`, in bytes: longer keys are not collected.
    max_key: usize,
}

fn build_tree(asserts: &[Assertion]) -> Vec<Node> {
    #[derive(Default)]
    struct B {
        children: BTreeMap<String, usize>,
        each: Option<usize>,
        leaves: Vec<usize>,
        below: Vec<usize>,
    }
    let mut nodes = vec![B::default()];
    for (i, a) in asserts.iter().enumerate() {
        let mut n = 0;
        nodes[n].below.push(i);
        for seg in &a.segments {
            let existing = match seg {
                Segment::Key(k) => nodes[n].children.get(k).copied(),
                Segment::Each => nodes[n].each,
            };
            let next = existing.unwrap_or_else(|| {
                nodes.push(B::default());
                let new = nodes.len() - 1;
                match seg {
                    Segment::Key(k) => nodes[n].children.insert(k.clone(), new),
                    Segment::Each => nodes[n].each.replace(new),
                };
                new
            });
            n = next;
            nodes[n].below.push(i);
        }
        nodes[n].leaves.push(i);
    }
    nodes
        .into_iter()
        .map(|b| Node {
            max_key: b.children.keys().map(String::len).max().unwrap_or(0),
            children: b.children.into_iter().collect(),
            each: b.each,
            leaves: b.leaves,
            below: b.below,
        })
        .collect()
}

struct Findings {
    /// First failure of each failing assertion, by index.
    failures: BTreeMap<usize, String>,
}

impl Findings {
    fn fail(&mut self, i: usize, reason: String) {
        self.failures.entry(i).or_insert(reason);
    }

    fn missing(&mut self, asserts: &[Assertion], below: &[usize], at: &str) {
        for &i in below {
            if !asserts[i].optional {
                self.fail(i, format!("{}: no value at {at}", asserts[i].pointer));
            }
        }
    }
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn check(a: &Assertion, lote_id: &str, v: &Value) -> Result<(), String> {
    let got = value_text(v);
    let ok = match (&a.check, &got) {
        (Check::Equals(t), Some(g)) => *g == t.replace("{lote_id}", lote_id),
        (Check::OneOf(list), Some(g)) => list.iter().any(|x| x == g),
        (_, None) => false,
    };
    if ok {
        return Ok(());
    }
    let shown: String = v.to_string().chars().take(80).collect();
    Err(match &a.check {
        Check::Equals(t) => format!("{}: expected {:?}, got {shown}", a.pointer, t.replace("{lote_id}", lote_id)),
        Check::OneOf(list) => format!("{}: expected one of {list:?}, got {shown}", a.pointer),
    })
}

/// Evaluates node `n`'s subtree on a materialized value.
fn eval(nodes: &[Node], asserts: &[Assertion], lote_id: &str, findings: &mut Findings, n: usize, v: &Value) {
    let node = &nodes[n];
    for &i in &node.leaves {
        if let Err(reason) = check(&asserts[i], lote_id, v) {
            findings.fail(i, reason);
        }
    }
    for (k, child) in &node.children {
        match v.get(k) {
            Some(cv) => eval(nodes, asserts, lote_id, findings, *child, cv),
            None => findings.missing(asserts, &nodes[*child].below, k),
        }
    }
    if let Some(each) = node.each {
        match v.as_array() {
            Some(items) => items.iter().for_each(|item| eval(nodes, asserts, lote_id, findings, each, item)),
            None => findings.missing(asserts, &nodes[each].below, "*"),
        }
    }
}

/// Where the parser is in the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A value must come (the document's start, after `:`, after `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value in a container: `,` or the container's closing bracket.
    AfterValue,
    /// After the document's value: only whitespace may follow.
    Done,
    Str(Str),
    Num(Num),
    Lit {
        word: &'static [u8],
        at: u8,
    },
    Failed,
}

/// Inside a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Str {
    Plain,
    /// Inside a UTF-8 sequence: `need` more bytes, the next one in `lo..=hi`.
    Utf8 {
        need: u8,
        lo: u8,
        hi: u8,
    },
    /// After `\`.
    Escape,
    /// In `\uXXXX` after `n` digits; `high` is a leading surrogate this one must complete.
    Hex {
        n: u8,
        acc: u16,
        high: Option<u16>,
    },
    /// After a leading surrogate's escape: `\u` and a trailing surrogate must follow.
    HighBackslash(u16),
    HighU(u16),
}

/// Inside a number, in serde_json's grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    FracFirst,
    Frac,
    ExpStart,
    ExpSign,
    Exp,
}

/// A number's value as serde_json (without `float_roundtrip`) accumulates it, to decide
/// exactly as it does whether the number is out of range.
#[derive(Debug, Default, Clone, Copy)]
struct NumAcc {
    significand: u64,
    /// Decimal exponent: integer digits dropped on overflow, minus fraction digits kept.
    exponent: i32,
    /// The integer part overflowed `u64`: its further digits only scale.
    long: bool,
    /// The fraction overflowed: its further digits are ignored.
    frac_full: bool,
    exp_positive: bool,
    exp: i32,
    exp_overflow: bool,
    /// `exponent` when the exponent part began.
    start_exp: i32,
}

impl NumAcc {
    /// Whether serde_json accepts the number (it fails with "number out of range" where the
    /// value would be infinite).
    fn in_range(&self, phase: Num) -> bool {
        match phase {
            Num::Zero | Num::Int if !self.long => true,
            Num::Exp if self.exp_overflow => !(self.significand != 0 && self.exp_positive),
            Num::Exp => {
                let e = if self.exp_positive {
                    self.start_exp.saturating_add(self.exp)
                } else {
                    self.start_exp.saturating_sub(self.exp)
                };
                f64_in_range(self.significand, e)
            }
            _ => f64_in_range(self.significand, self.exponent),
        }
    }
}

/// serde_json's `f64_from_parts` without `float_roundtrip`: `significand * 10^exponent`, an
/// error if infinite.
fn f64_in_range(significand: u64, exponent: i32) -> bool {
    static POW10: OnceLock<Vec<f64>> = OnceLock::new();
    if exponent < 0 || significand == 0 {
        return true;
    }
    let pow10 = POW10.get_or_init(|| (0..=308).map(|i| format!("1e{i}").parse().unwrap()).collect());
    match pow10.get(exponent as usize) {
        Some(pow) => (significand as f64 * pow).is_finite(),
        None => false,
    }
}

/// `a * 10 + d` would exceed `max` (serde_json's `overflow!`).
fn overflows<T: Into<u64>>(a: T, d: u8, max: u64) -> bool {
    let a = a.into();
    a >= max / 10 && (a > max / 10 || u64::from(d) > max % 10)
}

/// One open array or object.
struct Frame {
    object: bool,
    /// The pointer tree's node at this container, when some assertion goes through it.
    node: Option<usize>,
    /// For an object at a node: which of the node's children have been seen.
    seen: Vec<bool>,
    /// For an object: the node of the current key's value.
    pending: Option<usize>,
}

/// The push parser: a JSON tokenizer in serde_json's grammar (validity as
/// `serde_json::from_slice::<Value>` decides it) that walks the pointer tree as it goes.
struct Parser<V, L> {
    v: V,
    lote_id: L,
    nodes: Vec<Node>,
    findings: Findings,
    state: State,
    stack: Vec<Frame>,
    num: NumAcc,
    /// The current string is an object key.
    in_key: bool,
    /// The current key is collected (its object is at a node with children).
    collect_key: bool,
    key: Vec<u8>,
    key_too_long: bool,
    /// While an asserted value is read: the stack depth it started at.
    capture: Option<usize>,
    captured: Vec<u8>,
    /// Where the capture starts in the current chunk.
    capture_from: usize,
    /// Bytes of the body before the current chunk.
    offset: u64,
    error: Option<String>,
}

impl<V: std::ops::Deref<Target = Validation>, L: AsRef<str>> Parser<V, L> {
    fn new(v: V, lote_id: L) -> Self {
        let nodes = build_tree(&v.asserts);
        Parser {
            v,
            lote_id,
            nodes,
            findings: Findings { failures: BTreeMap::new() },
            state: State::Value,
            stack: Vec::new(),
            num: NumAcc::default(),
            in_key: false,
            collect_key: false,
            key: Vec::new(),
            key_too_long: false,
            capture: None,
            captured: Vec::new(),
            capture_from: 0,
            offset: 0,
            error: None,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        if self.state == State::Failed {
            return;
        }
        self.capture_from = 0;
        let mut i = 0;
        while i < data.len() {
            if let State::Str(Str::Plain) = self.state {
                // The common case, a run of plain ASCII in a string.
                let run = data[i..].iter().position(|&c| !(0x20..0x80).contains(&c) || c == b'"' || c == b'\\');
                let end = run.map_or(data.len(), |r| i + r);
                if end > i {
                    if self.collect_key {
                        self.key_bytes(&data[i..end]);
                    }
                    i = end;
                    continue;
                }
            }
            if self.byte(data, i) {
                i += 1;
            }
            if self.state == State::Failed {
                return;
            }
        }
        if self.capture.is_some() {
            self.captured.extend_from_slice(&data[self.capture_from..]);
        }
        self.offset += data.len() as u64;
    }

    fn finish(mut self) -> Verdict {
        self.capture_from = 0;
        if let State::Num(phase) = self.state {
            if matches!(phase, Num::Zero | Num::Int | Num::Frac | Num::Exp) {
                self.end_number(&[], 0, phase);
            }
        }
        match self.state {
            State::Failed => {}
            State::Done => {}
            State::Value if self.stack.is_empty() && self.offset == 0 => self.fail(0, "an empty body"),
            _ => self.fail(0, "the body ends inside a value"),
        }
        if let Some(e) = self.error {
            return invalid_json(format!("the body is not one valid JSON document: {e}"));
        }
        let asserts = &self.v.asserts;
        // Aborting failures take precedence over don't-store ones.
        let worst = self.findings.failures.into_iter().min_by_key(|(i, _)| (asserts[*i].on_fail != OnFail::Abort, *i));
        match worst {
            None => Verdict::Valid,
            Some((i, reason)) => {
                let a = &asserts[i];
                Verdict::Invalid { token: detail_token(&a.pointer), reason, on_fail: a.on_fail }
            }
        }
    }

    fn fail(&mut self, i: usize, what: &str) {
        self.state = State::Failed;
        self.error = Some(format!("{what} at byte {}", self.offset + i as u64));
        self.stack = Vec::new();
        self.captured = Vec::new();
        self.key = Vec::new();
    }

    /// Handles `data[i]`; false when the byte ended a number and must be handled again in the
    /// state that follows.
    fn byte(&mut self, data: &[u8], i: usize) -> bool {
        let b = data[i];
        let ws = matches!(b, b' ' | b'\n' | b'\t' | b'\r');
        match self.state {
            State::Value | State::ArrayFirst if ws => {}
            State::ArrayFirst if b == b']' => self.close(data, i),
            State::Value | State::ArrayFirst => self.value_start(data, i),
            State::ObjectFirst | State::Key | State::Colon | State::AfterValue | State::Done if ws => {}
            State::ObjectFirst if b == b'}' => self.close(data, i),
            State::ObjectFirst | State::Key if b == b'"' => {
                self.in_key = true;
                let node = self.stack.last().and_then(|f| f.node);
                self.collect_key = node.is_some_and(|n| !self.nodes[n].children.is_empty());
                self.key.clear();
                self.key_too_long = false;
                self.state = State::Str(Str::Plain);
            }
            State::ObjectFirst | State::Key => self.fail(i, "expected a key"),
            State::Colon if b == b':' => self.state = State::Value,
            State::Colon => self.fail(i, "expected ':'"),
            State::AfterValue => {
                let object = self.stack.last().is_some_and(|f| f.object);
                match (b, object) {
                    (b',', true) => self.state = State::Key,
                    (b',', false) => self.state = State::Value,
                    (b'}', true) | (b']', false) => self.close(data, i),
                    _ => self.fail(i, "expected ',' or the end of the container"),
                }
            }
            State::Done => self.fail(i, "trailing characters"),
            State::Lit { word, at } => {
                if b != word[at as usize] {
                    self.fail(i, "invalid literal");
                } else if at as usize + 1 == word.len() {
                    self.value_end(data, i + 1);
                } else {
                    self.state = State::Lit { word, at: at + 1 };
                }
            }
            State::Num(phase) => return self.number(data, i, phase),
            State::Str(s) => self.string(data, i, s),
            State::Failed => {}
        }
        true
    }

    /// The first byte of a value.
    fn value_start(&mut self, data: &[u8], i: usize) {
        let b = data[i];
        let container = b == b'{' || b == b'[';
        if !container && !matches!(b, b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') {
            return self.fail(i, "expected a value");
        }
        // The pointer tree's node at this value, if any.
        let node = match self.capture.is_some() {
            true => None,
            false => match self.stack.last() {
                None => Some(0),
                Some(f) if f.object => f.pending,
                Some(f) => f.node.and_then(|n| self.nodes[n].each),
            },
        };
        let node = match node {
            // An asserted value: small by nature (an id, a state), so it is materialized.
            Some(n) if !self.nodes[n].leaves.is_empty() => {
                self.capture = Some(self.stack.len());
                self.captured.clear();
                self.capture_from = i;
                None
            }
            n => n,
        };
        if container {
            if self.stack.len() >= MAX_DEPTH {
                return self.fail(i, "recursion limit exceeded");
            }
            let object = b == b'{';
            let seen = match node {
                Some(n) if object => vec![false; self.nodes[n].children.len()],
                _ => Vec::new(),
            };
            self.stack.push(Frame { object, node, seen, pending: None });
            self.state = if object { State::ObjectFirst } else { State::ArrayFirst };
            return;
        }
        if let Some(n) = node {
            // A scalar where the pointers expect a container.
            self.findings.missing(&self.v.asserts, &self.nodes[n].below, "(not a container)");
        }
        self.state = match b {
            b'"' => {
                self.in_key = false;
                self.collect_key = false;
                State::Str(Str::Plain)
            }
            b't' => State::Lit { word: b"true", at: 1 },
            b'f' => State::Lit { word: b"false", at: 1 },
            b'n' => State::Lit { word: b"null", at: 1 },
            b'-' => {
                self.num = NumAcc::default();
                State::Num(Num::Minus)
            }
            b'0' => {
                self.num = NumAcc::default();
                State::Num(Num::Zero)
            }
            d => {
                self.num = NumAcc { significand: u64::from(d - b'0'), ..NumAcc::default() };
                State::Num(Num::Int)
            }
        };
    }

    /// A value ended just before `data[end]`.
    fn value_end(&mut self, data: &[u8], end: usize) {
        if self.capture == Some(self.stack.len()) {
            self.capture = None;
            self.captured.extend_from_slice(&data[self.capture_from..end]);
            let node = match self.stack.last() {
                None => 0,
                Some(f) if f.object => f.pending.expect("a captured value has a node"),
                Some(f) => self.nodes[f.node.expect("a captured value has a node")].each.expect("an array node"),
            };
            match serde_json::from_slice::<Value>(&self.captured) {
                Ok(v) => {
                    eval(&self.nodes, &self.v.asserts, self.lote_id.as_ref(), &mut self.findings, node, &v);
                    self.captured.clear();
                }
                // Not expected: the tokenizer accepted it.
                Err(e) => return self.fail(end, &format!("{e}")),
            }
        }
        match self.stack.last_mut() {
            None => self.state = State::Done,
            Some(f) => {
                f.pending = None;
                self.state = State::AfterValue;
            }
        }
    }

    /// `data[i]` closes the innermost container.
    fn close(&mut self, data: &[u8], i: usize) {
        let f = self.stack.pop().expect("an open container");
        if let Some(n) = f.node {
            let (asserts, node) = (&self.v.asserts, &self.nodes[n]);
            if f.object {
                for ((k, child), seen) in node.children.iter().zip(&f.seen) {
                    if !seen {
                        self.findings.missing(asserts, &self.nodes[*child].below, k);
                    }
                }
                if let Some(each) = node.each {
                    self.findings.missing(asserts, &self.nodes[each].below, "* (an object, not an array)");
                }
            } else {
                for (k, child) in &node.children {
                    self.findings.missing(asserts, &self.nodes[*child].below, k);
                }
            }
        }
        self.value_end(data, i + 1);
    }

    fn number(&mut self, data: &[u8], i: usize, phase: Num) -> bool {
        let b = data[i];
        let n = &mut self.num;
        let next = match (phase, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => {
                n.significand = u64::from(b - b'0');
                Num::Int
            }
            (Num::Zero, b'0'..=b'9') => return self.fail_consumed(i, "invalid number (a leading zero)"),
            (Num::Int, b'0'..=b'9') => {
                let d = b - b'0';
                if n.long || overflows(n.significand, d, u64::MAX) {
                    // Past u64, serde_json drops the digit and scales.
                    n.long = true;
                    n.exponent = n.exponent.wrapping_add(1);
                } else {
                    n.significand = n.significand * 10 + u64::from(d);
                }
                Num::Int
            }
            (Num::Zero | Num::Int, b'.') => Num::FracFirst,
            (Num::FracFirst | Num::Frac, b'0'..=b'9') => {
                let d = b - b'0';
                if n.frac_full || overflows(n.significand, d, u64::MAX) {
                    n.frac_full = true;
                } else {
                    n.significand = n.significand * 10 + u64::from(d);
                    n.exponent -= 1;
                }
                Num::Frac
            }
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => {
                n.start_exp = n.exponent;
                n.exp_positive = true;
                Num::ExpStart
            }
            (Num::ExpStart, b'+') => Num::ExpSign,
            (Num::ExpStart, b'-') => {
                n.exp_positive = false;
                Num::ExpSign
            }
            (Num::ExpStart | Num::ExpSign | Num::Exp, b'0'..=b'9') => {
                let d = b - b'0';
                if phase != Num::Exp {
                    n.exp = i32::from(d);
                } else if n.exp_overflow || overflows(n.exp as u32, d, i32::MAX as u64) {
                    n.exp_overflow = true;
                } else {
                    n.exp = n.exp * 10 + i32::from(d);
                }
                Num::Exp
            }
            (Num::Zero | Num::Int | Num::Frac | Num::Exp, _) => {
                self.end_number(data, i, phase);
                return false;
            }
            (Num::Minus | Num::FracFirst | Num::ExpStart | Num::ExpSign, _) => {
                return self.fail_consumed(i, "invalid number");
            }
        };
        self.state = State::Num(next);
        true
    }

    fn fail_consumed(&mut self, i: usize, what: &str) -> bool {
        self.fail(i, what);
        true
    }

    /// A complete number ends before `data[end]`.
    fn end_number(&mut self, data: &[u8], end: usize, phase: Num) {
        if !self.num.in_range(phase) {
            return self.fail(end, "number out of range");
        }
        self.value_end(data, end);
    }

    fn string(&mut self, data: &[u8], i: usize, s: Str) {
        let b = data[i];
        let next = match s {
            Str::Plain => match b {
                b'"' => {
                    if self.in_key {
                        self.end_key();
                    } else {
                        self.value_end(data, i + 1);
                    }
                    return;
                }
                b'\\' => Str::Escape,
                0x00..=0x1f => return self.fail(i, "a control character in a string"),
                0x20..=0x7f => {
                    self.key_bytes(&[b]);
                    Str::Plain
                }
                0xc2..=0xdf => self.utf8_lead(b, 1, 0x80, 0xbf),
                0xe0 => self.utf8_lead(b, 2, 0xa0, 0xbf),
                0xe1..=0xec | 0xee..=0xef => self.utf8_lead(b, 2, 0x80, 0xbf),
                0xed => self.utf8_lead(b, 2, 0x80, 0x9f),
                0xf0 => self.utf8_lead(b, 3, 0x90, 0xbf),
                0xf1..=0xf3 => self.utf8_lead(b, 3, 0x80, 0xbf),
                0xf4 => self.utf8_lead(b, 3, 0x80, 0x8f),
                _ => return self.fail(i, "invalid UTF-8 in a string"),
            },
            Str::Utf8 { need, lo, hi } => {
                if !(lo..=hi).contains(&b) {
                    return self.fail(i, "invalid UTF-8 in a string");
                }
                self.key_bytes(&[b]);
                if need == 1 {
                    Str::Plain
                } else {
                    Str::Utf8 { need: need - 1, lo: 0x80, hi: 0xbf }
                }
            }
            Str::Escape => {
                let c = match b {
                    b'"' | b'\\' | b'/' => b,
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        self.state = State::Str(Str::Hex { n: 0, acc: 0, high: None });
                        return;
                    }
                    _ => return self.fail(i, "an invalid escape"),
                };
                self.key_bytes(&[c]);
                Str::Plain
            }
            Str::Hex { n, acc, high } => {
                let Some(d) = (b as char).to_digit(16) else { return self.fail(i, "an invalid \\u escape") };
                let acc = acc << 4 | d as u16;
                if n < 3 {
                    Str::Hex { n: n + 1, acc, high }
                } else {
                    // serde_json wants surrogates paired, a leading one then a trailing one.
                    match (high, acc) {
                        (Some(h), 0xdc00..=0xdfff) => {
                            let c = 0x10000 + ((u32::from(h) - 0xd800) << 10) + (u32::from(acc) - 0xdc00);
                            self.key_char(c);
                            Str::Plain
                        }
                        (Some(_), _) | (None, 0xdc00..=0xdfff) => return self.fail(i, "a lone surrogate"),
                        (None, 0xd800..=0xdbff) => Str::HighBackslash(acc),
                        (None, c) => {
                            self.key_char(u32::from(c));
                            Str::Plain
                        }
                    }
                }
            }
            Str::HighBackslash(h) if b == b'\\' => Str::HighU(h),
            Str::HighU(h) if b == b'u' => Str::Hex { n: 0, acc: 0, high: Some(h) },
            Str::HighBackslash(_) | Str::HighU(_) => return self.fail(i, "a lone surrogate"),
        };
        self.state = State::Str(next);
    }

    fn utf8_lead(&mut self, b: u8, need: u8, lo: u8, hi: u8) -> Str {
        self.key_bytes(&[b]);
        Str::Utf8 { need, lo, hi }
    }

    fn key_char(&mut self, c: u32) {
        let c = char::from_u32(c).expect("not a surrogate");
        self.key_bytes(c.encode_utf8(&mut [0; 4]).as_bytes());
    }

    /// Collects decoded bytes of a key, up to the longest key that could match.
    fn key_bytes(&mut self, bytes: &[u8]) {
        if !self.collect_key || self.key_too_long {
            return;
        }
        let max = self.stack.last().and_then(|f| f.node).map_or(0, |n| self.nodes[n].max_key);
        if self.key.len() + bytes.len() > max {
            self.key_too_long = true;
            self.key.clear();
        } else {
            self.key.extend_from_slice(bytes);
        }
    }

    fn end_key(&mut self) {
        self.state = State::Colon;
        if !self.collect_key || self.key_too_long {
            return;
        }
        let f = self.stack.last_mut().expect("a key is in an object");
        let node = &self.nodes[f.node.expect("keys are collected at a node")];
        match node.children.binary_search_by(|(k, _)| k.as_bytes().cmp(&self.key)) {
            Ok(at) => {
                f.seen[at] = true;
                f.pending = Some(node.children[at].1);
            }
            Err(_) => f.pending = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three checks the shipped config enables for the batch-results route.
    pub fn batch_rules() -> Validation {
        let a = |p: &str, check: Check, optional: bool, on_fail: OnFail| Assertion {
            pointer: p.into(),
            segments: parse_pointer(p).unwrap(),
            check,
            optional,
            on_fail,
        };
        Validation {
            json: true,
            asserts: vec![
                a("/metadata/lote_id", Check::Equals("{lote_id}".into()), false, OnFail::Abort),
                a("/archivos_procesados/*/lote_id", Check::Equals("{lote_id}".into()), false, OnFail::Abort),
                a("/metadata/estado", Check::OneOf(vec!["completado".into()]), true, OnFail::DontStore),
            ],
        }
    }

    fn verdict(doc: &str) -> Verdict {
        validate_slice(&batch_rules(), "L1", doc.as_bytes())
    }

    fn token(doc: &str) -> (String, OnFail) {
        match verdict(doc) {
            Verdict::Invalid { token, on_fail, .. } => (token, on_fail),
            Verdict::Valid => panic!("{doc} passed"),
        }
    }

    #[test]
    fn a_consistent_batch_passes() {
        let doc = r#"{"metadata":{"lote_id":"L1","estado":"completado","x":[1,{"a":null}]},
                      "archivos_procesados":[{"lote_id":"L1","texto":"…"},{"lote_id":"L1"}]}"#;
        assert_eq!(verdict(doc), Verdict::Valid);
        assert_eq!(verdict(r#"{"metadata":{"lote_id":"L1"},"archivos_procesados":[]}"#), Verdict::Valid);
    }

    #[test]
    fn another_batchs_id_anywhere_aborts() {
        let wrong_meta = r#"{"metadata":{"lote_id":"L2"},"archivos_procesados":[{"lote_id":"L1"}]}"#;
        assert_eq!(token(wrong_meta), ("validation:/metadata/lote_id".into(), OnFail::Abort));
        let wrong_item = r#"{"metadata":{"lote_id":"L1"},"archivos_procesados":[{"lote_id":"L1"},{"lote_id":"L2"}]}"#;
        assert_eq!(token(wrong_item), ("validation:/archivos_procesados/*/lote_id".into(), OnFail::Abort));
        let missing_item_id = r#"{"metadata":{"lote_id":"L1"},"archivos_procesados":[{"nombre":"x"}]}"#;
        assert_eq!(token(missing_item_id).1, OnFail::Abort);
        let no_files = r#"{"metadata":{"lote_id":"L1"}}"#;
        assert_eq!(token(no_files).1, OnFail::Abort);
    }

    #[test]
    fn a_batch_still_processing_is_not_stored_but_not_aborted() {
        let doc = r#"{"metadata":{"lote_id":"L1","estado":"en_proceso"},"archivos_procesados":[]}"#;
        assert_eq!(token(doc), ("validation:/metadata/estado".into(), OnFail::DontStore));
    }

    #[test]
    fn truncated_or_trailing_garbage_is_invalid_json() {
        let doc = r#"{"metadata":{"lote_id":"L1"},"archivos_procesados":[{"lote_id":"L1"}"#;
        assert_eq!(token(doc), ("invalid-json".into(), OnFail::Abort));
        assert_eq!(token(r#"{"metadata":{"lote_id":"L1"},"archivos_procesados":[]} x"#).0, "invalid-json");
    }

    #[test]
    fn streaming_in_arbitrary_chunks_gives_the_same_verdict() {
        let doc = lotecache_doc();
        let mut v = StreamingValidator::new(Arc::new(batch_rules()), "L1".into());
        for chunk in doc.as_bytes().chunks(7) {
            v.feed(chunk);
        }
        assert_eq!(v.finish(), Verdict::Valid);
    }

    fn lotecache_doc() -> String {
        crate::sample_origin::batch_document("L1", 20_000)
    }

    fn json_only() -> Validation {
        Validation { json: true, asserts: vec![] }
    }

    /// Feeds `doc` in chunks of the given sizes (cycled; 0 means 1).
    fn fed(v: &Validation, lote_id: &str, doc: &[u8], sizes: &[usize]) -> Verdict {
        let mut p = StreamingValidator::new(Arc::new(v.clone()), lote_id.into());
        let mut rest = doc;
        let mut sizes = sizes.iter().cycle();
        while !rest.is_empty() {
            let n = sizes.next().copied().unwrap_or(rest.len()).clamp(1, rest.len());
            let (chunk, tail) = rest.split_at(n);
            p.feed(chunk);
            rest = tail;
        }
        p.finish()
    }

    fn serde_accepts(doc: &[u8]) -> bool {
        serde_json::from_slice::<Value>(doc).is_ok()
    }

    fn is_valid(v: &Verdict) -> bool {
        *v == Verdict::Valid
    }

    /// The classes where a JSON parser is most likely to disagree with serde_json.
    #[test]
    fn edge_cases_are_judged_as_serde_json_judges_them() {
        let mut cases: Vec<Vec<u8>> = [
            "",
            " ",
            "1",
            " 1 ",
            "1 x",
            "\u{feff}1",
            "01",
            "-01",
            "-",
            "-0",
            "1.",
            "1.e5",
            ".5",
            "+1",
            "1e",
            "1e+",
            "1E-0",
            "0e99999999999999",
            "1e99999999999999",
            "1e-99999999999999",
            "1e400",
            "1e308",
            "17e307",
            "18e307",
            "1.8e308",
            "-1e309",
            "184467440737095516160e290",
            "18446744073709551615",
            "18446744073709551616",
            "18446744073709551616.5",
            "-9223372036854775809",
            "0.0000000000000000000000000000001e330",
            "tru",
            "true",
            "nul",
            "nulll",
            "[1,]",
            "[,1]",
            "{\"a\":1,}",
            "{\"a\"1}",
            "{1:1}",
            "[1 2]",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\udc00\"",
            "\"\\ud800\\u0041\"",
            "\"\\ud800\\n\"",
            "\"\\ud800\\ud800\\udc00\"",
            "\"\\uD83D\\uDE00\"",
            "\"\\u00e9\"",
            "\"\\u00G9\"",
            "\"\\x\"",
            "\"\\/\"",
            "\"\u{7f}\"",
            "\"\t\"",
            "\"a",
            "[\"a\",\"b\"]]",
            "{}}",
            "\u{a0}1",
            "1\u{c}",
            "[1]\n\r\t ",
            "{\"a\":[{\"b\":null}]}",
            "NaN",
            "Infinity",
            "-Infinity",
        ]
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
        let long_int = format!("1{}", "0".repeat(400));
        let long_frac = format!("0.{}1e400", "0".repeat(400));
        cases.extend([long_int.into_bytes(), long_frac.into_bytes()]);
        for bytes in
            [&[0x22, 0xff, 0x22][..], &[0x22, 0xc3, 0x22], &[0x22, 0xc3, 0xa9, 0x22], &[0x22, 0xed, 0xa0, 0x80, 0x22]]
        {
            cases.push(bytes.to_vec());
        }
        cases.push(b"\"\xf4\x90\x80\x80\"".to_vec());
        cases.push(b"\"\xf0\x9f\x98\x80\"".to_vec());
        cases.push(b"\"\xe0\x80\xaf\"".to_vec());
        for depth in 120..=135 {
            cases.push(format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes());
            cases.push(format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)).into_bytes());
            cases.push(format!("{}{}", "[{\"a\":".repeat(depth / 2), "}]".repeat(depth / 2)).into_bytes());
        }
        for case in &cases {
            let expected = serde_accepts(case);
            for sizes in [&[usize::MAX][..], &[1], &[2, 3]] {
                let got = fed(&json_only(), "L1", case, sizes);
                assert_eq!(
                    is_valid(&got),
                    expected,
                    "{:?} in chunks of {sizes:?}: {got:?}",
                    String::from_utf8_lossy(case)
                );
            }
            assert_eq!(is_valid(&validate_slice(&json_only(), "L1", case)), expected);
        }
    }

    /// The regression this parser was written for: each validated fill held a blocking thread
    /// for its whole life, so a few hundred fills starved the store's blocking work.
    #[test]
    fn validators_in_flight_hold_no_blocking_thread() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().max_blocking_threads(1).build().unwrap();
        rt.block_on(async {
            let rules = Arc::new(batch_rules());
            let mut fills: Vec<_> = (0..300).map(|_| StreamingValidator::new(rules.clone(), "L1".into())).collect();
            for v in &mut fills {
                v.feed(br#"{"metadata":{"lote_id":"L1"},"archivos_procesados":[{"lote_id":"#);
            }
            let store_write = tokio::task::spawn_blocking(|| 7);
            let done = tokio::time::timeout(std::time::Duration::from_secs(5), store_write).await;
            assert_eq!(done.expect("the blocking pool is free").unwrap(), 7);
            for mut v in fills {
                v.feed(br#""L1"}]}"#);
                assert_eq!(v.finish(), Verdict::Valid);
            }
        });
    }

    #[test]
    fn feeding_after_malformed_json_keeps_the_verdict_and_holds_nothing() {
        let mut v = StreamingValidator::new(Arc::new(batch_rules()), "L1".into());
        v.feed(b"{\"metadata\":{\"lote_id\":\"L1\"}}}");
        assert_eq!(v.parser.state, State::Failed);
        for _ in 0..100 {
            v.feed(&[b'['; 4096]);
        }
        assert!(v.parser.stack.capacity() == 0 && v.parser.captured.capacity() == 0);
        assert_eq!(v.finish().token_and_fail().0, "invalid-json");
    }

    #[test]
    fn unasserted_strings_and_keys_are_not_held_whatever_their_size() {
        let big = "x".repeat(1 << 20);
        let doc = format!(
            r#"{{"metadata":{{"lote_id":"L1","{big}":1,"texto":"{big}"}},"{big}":["{big}"],"archivos_procesados":[{{"lote_id":"L1","t":"{big}"}}]}}"#
        );
        let mut v = StreamingValidator::new(Arc::new(batch_rules()), "L1".into());
        let mut peak = 0;
        for chunk in doc.as_bytes().chunks(1000) {
            v.feed(chunk);
            peak = peak.max(v.parser.captured.capacity() + v.parser.key.capacity());
        }
        assert!(peak < 1024, "held {peak} bytes");
        assert_eq!(v.finish(), Verdict::Valid);
    }

    impl Verdict {
        fn token_and_fail(&self) -> (String, Option<OnFail>) {
            match self {
                Verdict::Valid => (String::new(), None),
                Verdict::Invalid { token, on_fail, .. } => (token.clone(), Some(*on_fail)),
            }
        }
    }

    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            (-1e6..1e6f64).prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[a-z\"\\\\/\u{0}-\u{1f}\u{7f}-\u{a0}\u{fffd}\u{1F600}]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((any::<String>(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn arb_document() -> impl Strategy<Value = Vec<u8>> {
        (arb_value(), any::<bool>(), "[ \t\r\n]{0,3}").prop_map(|(v, pretty, ws)| {
            let mut doc = if pretty { serde_json::to_vec_pretty(&v) } else { serde_json::to_vec(&v) }.unwrap();
            doc.extend_from_slice(ws.as_bytes());
            doc
        })
    }

    /// Chunk sizes: sometimes all 1-byte chunks, otherwise a cycle of small and large sizes.
    fn arb_sizes() -> impl Strategy<Value = Vec<usize>> {
        prop_oneof![Just(vec![1]), Just(vec![usize::MAX]), prop::collection::vec(1usize..40, 1..8)]
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(prop::sample::Index, u8),
        Insert(prop::sample::Index, u8),
        Delete(prop::sample::Index),
        Truncate(prop::sample::Index),
    }

    fn arb_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            prop::sample::select(b"{}[]:,\"\\/-+.eE0123456789 \n\tutfnlrabx".to_vec()),
            prop::sample::select(vec![0x00, 0x1f, 0x7f, 0x80, 0xbf, 0xc0, 0xc3, 0xe0, 0xed, 0xa0, 0xf4, 0xf5, 0xff]),
            any::<u8>(),
        ]
    }

    fn arb_mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<prop::sample::Index>(), arb_byte()).prop_map(|(i, b)| Mutation::Flip(i, b)),
            (any::<prop::sample::Index>(), arb_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<prop::sample::Index>().prop_map(Mutation::Delete),
            any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        ]
    }

    fn mutate(mut doc: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
        for m in mutations {
            let len = doc.len();
            match m {
                Mutation::Flip(i, b) if len > 0 => doc[i.index(len)] = *b,
                Mutation::Insert(i, b) => doc.insert(i.index(len + 1), *b),
                Mutation::Delete(i) if len > 0 => {
                    doc.remove(i.index(len));
                }
                Mutation::Truncate(i) => doc.truncate(i.index(len + 1)),
                _ => {}
            }
        }
        doc
    }

    /// Number-like and string-escape-like fragments, where random mutation rarely lands.
    fn arb_fragment() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            "-?[0-9]{0,25}(\\.[0-9]{0,25})?([eE][+-]?[0-9]{0,12})?".prop_map(String::into_bytes),
            "[-+.eE0-9]{0,30}".prop_map(String::into_bytes),
            prop::collection::vec(
                prop::sample::select(vec![
                    "\\ud800",
                    "\\udbff",
                    "\\udc00",
                    "\\udfff",
                    "\\u0041",
                    "\\u00e9",
                    "\\uD83D",
                    "\\uDE00",
                    "\\n",
                    "\\x",
                    "\\",
                    "\\u12",
                    "a",
                    "\u{e9}",
                    "\u{1F600}",
                    "\t",
                    "\u{7f}",
                ]),
                0..6
            )
            .prop_map(|parts| format!("\"{}\"", parts.concat()).into_bytes()),
        ]
        .prop_map(|f| {
            let mut doc = b"[".to_vec();
            doc.extend_from_slice(&f);
            doc.push(b']');
            doc
        })
    }

    /// What the batch rules say, evaluated directly on a serde_json value.
    fn reference_verdict(rules: &Validation, lote_id: &str, doc: &Value) -> (String, Option<OnFail>) {
        fn values<'a>(v: &'a Value, segs: &[Segment], out: &mut Vec<Option<&'a Value>>) {
            match segs.split_first() {
                None => out.push(Some(v)),
                Some((Segment::Key(k), rest)) => match v.as_object().and_then(|m| m.get(k)) {
                    Some(c) => values(c, rest, out),
                    None => out.push(None),
                },
                Some((Segment::Each, rest)) => match v.as_array() {
                    Some(items) => items.iter().for_each(|item| values(item, rest, out)),
                    None => out.push(None),
                },
            }
        }
        let text = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        let failing = |a: &Assertion| {
            let mut found = Vec::new();
            values(doc, &a.segments, &mut found);
            found.iter().any(|v| match v {
                None => !a.optional,
                Some(v) => match (&a.check, text(v)) {
                    (_, None) => true,
                    (Check::Equals(t), Some(g)) => g != t.replace("{lote_id}", lote_id),
                    (Check::OneOf(list), Some(g)) => !list.contains(&g),
                },
            })
        };
        let failed: Vec<&Assertion> = rules.asserts.iter().filter(|a| failing(a)).collect();
        let worst = failed.iter().find(|a| a.on_fail == OnFail::Abort).or(failed.first());
        match worst {
            None => (String::new(), None),
            Some(a) => (detail_token(&a.pointer), Some(a.on_fail)),
        }
    }

    fn arb_id_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => prop::sample::select(vec!["L1", "L2", "1", "true", "l1", ""]).prop_map(Value::from),
            1 => Just(Value::from(1)),
            1 => Just(Value::from(1.0)),
            1 => Just(Value::Bool(true)),
            1 => Just(Value::Null),
            1 => Just(serde_json::json!({"lote_id": "L1"})),
            1 => Just(serde_json::json!(["L1"])),
        ]
    }

    /// Optional value: None leaves the key out.
    fn arb_batch() -> impl Strategy<Value = Value> {
        let item = prop_oneof![
            4 => (arb_id_value(), any::<bool>()).prop_map(|(id, extra)| {
                let mut m = serde_json::Map::new();
                m.insert("lote_id".into(), id);
                if extra {
                    m.insert("texto".into(), Value::from("…"));
                }
                Value::Object(m)
            }),
            1 => Just(serde_json::json!({"nombre": "x"})),
            1 => Just(Value::from("L1")),
            1 => Just(serde_json::json!([{"lote_id": "L1"}])),
        ];
        let files = prop_oneof![
            6 => prop::collection::vec(item, 0..5).prop_map(Value::Array),
            1 => Just(serde_json::json!({"lote_id": "L1"})),
            1 => Just(Value::from("L1")),
            1 => Just(Value::Null),
        ];
        let estado = prop::option::of(prop_oneof![
            Just(Value::from("completado")),
            Just(Value::from("en_proceso")),
            Just(Value::from(1)),
            Just(Value::Null),
        ]);
        let metadata = prop_oneof![
            6 => (prop::option::of(arb_id_value()), estado, any::<bool>()).prop_map(|(id, estado, extra)| {
                let mut m = serde_json::Map::new();
                if let Some(id) = id {
                    m.insert("lote_id".into(), id);
                }
                if let Some(e) = estado {
                    m.insert("estado".into(), e);
                }
                if extra {
                    m.insert("x".into(), serde_json::json!([1, {"lote_id": "L9"}]));
                }
                Value::Object(m)
            }),
            1 => Just(serde_json::json!(["L1"])),
            1 => Just(Value::from("L1")),
        ];
        (prop::option::of(metadata), prop::option::of(files), any::<bool>()).prop_map(|(metadata, files, extra)| {
            let mut m = serde_json::Map::new();
            if extra {
                m.insert("a".into(), serde_json::json!({"metadata": {"lote_id": "L9"}}));
            }
            if let Some(md) = metadata {
                m.insert("metadata".into(), md);
            }
            if let Some(f) = files {
                m.insert("archivos_procesados".into(), f);
            }
            Value::Object(m)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn the_streaming_validator_accepts_every_generated_document_whatever_the_chunking(
            doc in arb_document(),
            sizes in arb_sizes(),
        ) {
            prop_assert_eq!(fed(&json_only(), "L1", &doc, &sizes), Verdict::Valid);
        }

        #[test]
        fn the_streaming_validator_agrees_with_serde_json_on_mutated_documents(
            doc in arb_document(),
            mutations in prop::collection::vec(arb_mutation(), 1..4),
            sizes in arb_sizes(),
        ) {
            let doc = mutate(doc, &mutations);
            let got = fed(&json_only(), "L1", &doc, &sizes);
            prop_assert_eq!(is_valid(&got), serde_accepts(&doc), "{:?}: {:?}", String::from_utf8_lossy(&doc), got);
        }

        #[test]
        fn the_streaming_validator_agrees_with_serde_json_on_numbers_and_escapes(
            doc in arb_fragment(),
            mutations in prop::collection::vec(arb_mutation(), 0..2),
            sizes in arb_sizes(),
        ) {
            let doc = mutate(doc, &mutations);
            let got = fed(&json_only(), "L1", &doc, &sizes);
            prop_assert_eq!(is_valid(&got), serde_accepts(&doc), "{:?}: {:?}", String::from_utf8_lossy(&doc), got);
        }

        #[test]
        fn the_assertion_verdict_equals_a_direct_evaluation_of_the_pointers(
            doc in arb_batch(),
            pretty in any::<bool>(),
            lote_id in prop::sample::select(vec!["L1", "L2", "1", "true"]),
            sizes in arb_sizes(),
        ) {
            let rules = batch_rules();
            let bytes = if pretty { serde_json::to_vec_pretty(&doc) } else { serde_json::to_vec(&doc) }.unwrap();
            let got = fed(&rules, lote_id, &bytes, &sizes);
            prop_assert_eq!(got.token_and_fail(), reference_verdict(&rules, lote_id, &doc), "{}", doc);
        }
    }
}
