//! Validation of a document before it is stored: the body must parse as JSON, and values
//! at configured JSON pointers must equal a template (`{lote_id}`) or be one of a list.
//!
//! The document is parsed as it streams in, on a blocking thread fed chunk by chunk, with a
//! serde walk that materializes only the asserted values (everything else is skipped with
//! `IgnoredAny`), so memory stays flat whatever the document's size.

use bytes::Bytes;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::{collections::BTreeMap, fmt, io, sync::mpsc};

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
    validate_reader(v, lote_id, body)
}

/// Validates a document read from `reader`.
pub fn validate_reader(v: &Validation, lote_id: &str, reader: impl io::Read) -> Verdict {
    let tree = Node::build(&v.asserts);
    let mut findings = Findings { failures: BTreeMap::new() };
    let mut de = serde_json::Deserializer::from_reader(io::BufReader::with_capacity(64 * 1024, reader));
    let walked = Walk { node: &tree, asserts: &v.asserts, lote_id, findings: &mut findings }.deserialize(&mut de);
    if let Err(e) = walked.and_then(|_| de.end()) {
        return Verdict::Invalid {
            token: "invalid-json".into(),
            reason: format!("the body is not one valid JSON document: {e}"),
            on_fail: OnFail::Abort,
        };
    }
    // Aborting failures take precedence over don't-store ones.
    let worst = findings.failures.into_iter().min_by_key(|(i, _)| (v.asserts[*i].on_fail != OnFail::Abort, *i));
    match worst {
        None => Verdict::Valid,
        Some((i, reason)) => {
            let a = &v.asserts[i];
            Verdict::Invalid { token: detail_token(&a.pointer), reason, on_fail: a.on_fail }
        }
    }
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
pub struct StreamingValidator {
    tx: mpsc::Sender<Bytes>,
    handle: tokio::task::JoinHandle<Verdict>,
}

impl StreamingValidator {
    /// Starts validating on a blocking thread.
    pub fn spawn(v: std::sync::Arc<Validation>, lote_id: String) -> Self {
        let (tx, rx) = mpsc::channel();
        let handle = tokio::task::spawn_blocking(move || {
            validate_reader(&v, &lote_id, ChannelReader { rx, current: Bytes::new() })
        });
        StreamingValidator { tx, handle }
    }

    /// Hands a chunk to the validator (never blocks).
    pub fn feed(&self, chunk: Bytes) {
        let _ = self.tx.send(chunk);
    }

    /// Signals the end of the body and waits for the verdict.
    pub async fn finish(self) -> Verdict {
        drop(self.tx);
        self.handle.await.unwrap_or_else(|e| Verdict::Invalid {
            token: "validator-failed".into(),
            reason: format!("validator task failed: {e}"),
            on_fail: OnFail::Abort,
        })
    }
}

/// Reads chunks from a channel; the end of the channel is the end of the body.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(chunk) => self.current = chunk,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The pointers as a tree, so one pass over the document evaluates all of them.
#[derive(Default, Debug)]
struct Node {
    children: BTreeMap<String, Node>,
    each: Option<Box<Node>>,
    /// Assertions whose pointer ends here.
    leaves: Vec<usize>,
    /// Every assertion at or below this node.
    below: Vec<usize>,
}

impl Node {
    fn build(asserts: &[Assertion]) -> Node {
        let mut root = Node::default();
        for (i, a) in asserts.iter().enumerate() {
            let mut node = &mut root;
            node.below.push(i);
            for seg in &a.segments {
                node = match seg {
                    Segment::Key(k) => node.children.entry(k.clone()).or_default(),
                    Segment::Each => node.each.get_or_insert_with(Default::default),
                };
                node.below.push(i);
            }
            node.leaves.push(i);
        }
        root
    }
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

/// One step of the walk: the node of the pointer tree the current value sits at.
struct Walk<'a> {
    node: &'a Node,
    asserts: &'a [Assertion],
    lote_id: &'a str,
    findings: &'a mut Findings,
}

impl Walk<'_> {
    fn child<'b>(&'b mut self, node: &'b Node) -> Walk<'b> {
        Walk { node, asserts: self.asserts, lote_id: self.lote_id, findings: self.findings }
    }

    /// Evaluates this node's subtree on a materialized value.
    fn eval(&mut self, node: &Node, v: &Value) {
        for &i in &node.leaves {
            if let Err(reason) = check(&self.asserts[i], self.lote_id, v) {
                self.findings.fail(i, reason);
            }
        }
        for (k, child) in &node.children {
            match v.get(k) {
                Some(cv) => self.eval(child, cv),
                None => self.findings.missing(self.asserts, &child.below, k),
            }
        }
        if let Some(each) = &node.each {
            match v.as_array() {
                Some(items) => items.iter().for_each(|item| self.eval(each, item)),
                None => self.findings.missing(self.asserts, &each.below, "*"),
            }
        }
    }

    fn mismatch<E>(self) -> Result<(), E> {
        let below: Vec<usize> = self.node.below.clone();
        self.findings.missing(self.asserts, &below, "(not a container)");
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(mut self, d: D) -> Result<(), D::Error> {
        if self.node.leaves.is_empty() {
            return d.deserialize_any(self);
        }
        // An asserted value: small by nature (an id, a state), so it is materialized.
        let v = Value::deserialize(d)?;
        let node = self.node;
        self.eval(node, &v);
        Ok(())
    }
}

use serde::Deserialize as _;

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let node = self.node;
        let mut seen = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match node.children.get(&key) {
                Some(child) => {
                    map.next_value_seed(self.child(child))?;
                    seen.push(key);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        for (k, child) in &node.children {
            if !seen.contains(k) {
                self.findings.missing(self.asserts, &child.below, k);
            }
        }
        if let Some(each) = &node.each {
            self.findings.missing(self.asserts, &each.below, "* (an object, not an array)");
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let node = self.node;
        match &node.each {
            Some(each) => while seq.next_element_seed(self.child(each))?.is_some() {},
            None => while seq.next_element::<IgnoredAny>()?.is_some() {},
        }
        for (k, child) in &node.children {
            self.findings.missing(self.asserts, &child.below, k);
        }
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        self.mismatch()
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.mismatch()
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.mismatch()
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        self.mismatch()
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.mismatch()
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.mismatch()
    }
    fn visit_none<E>(self) -> Result<(), E> {
        self.mismatch()
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
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let verdict = rt.block_on(async {
            let v = StreamingValidator::spawn(std::sync::Arc::new(batch_rules()), "L1".into());
            for chunk in doc.as_bytes().chunks(7) {
                v.feed(Bytes::copy_from_slice(chunk));
            }
            v.finish().await
        });
        assert_eq!(verdict, Verdict::Valid);
    }

    fn lotecache_doc() -> String {
        crate::sample_origin::batch_document("L1", 20_000)
    }
}
