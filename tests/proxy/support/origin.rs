//! A test origin speaking raw HTTP/1.1 over TCP, so that it can break framing exactly as a
//! faulty backend would. `/download_batch_results/<id>` serves `document(id)` according to
//! the behaviour set for that id and counts a generation; every other path echoes the
//! request back as JSON. `/raw/download_batch_results/<id>` is the same batch (a second
//! proxy route, one without validation, fetches it there).
//!
//! For the fault model (`fault_model.rs`) it also keeps, per id, one-shot behaviours that
//! take precedence over the set one, a current document VERSION (a re-processed batch) with a
//! record of every version it generated, and a per-request `Set-Cookie: session=<token>`
//! mode, the token being the request's `x-test-client` header (or, without one, a token
//! unique to that answer), with a record of who got which.

use bytes::Bytes;
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// No delay, for [`Behavior::Ok`]'s `delay` and `gap`.
pub const NO_DELAY: Duration = Duration::ZERO;

/// How the origin answers a batch.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// 200 with Content-Length, after `delay`, body sent in `pieces` writes `gap` apart.
    Ok { delay: Duration, pieces: usize, gap: Duration },
    /// 200, chunked, complete.
    Chunked,
    /// 200, chunked, connection closed before the last chunk.
    ChunkedNoEnd,
    /// 200, chunked, connection closed after `send` bytes of the body (mid-chunk if it falls
    /// there), no last chunk.
    ChunkedCut { send: usize },
    /// 200 with the full Content-Length, but only `send` bytes, then close.
    CutShort { send: usize },
    /// 200 without Content-Length or chunking, ended by closing the connection after `send`
    /// bytes (None: the whole body).
    CloseDelimited { send: Option<usize> },
    /// This status with a small body.
    Status(u16),
    /// Accepts the request and never answers.
    Hang,
    /// Closes the connection without answering.
    Refuse,
    /// Sends half of the body, then stalls for `stall` before the rest.
    StallMidBody { stall: Duration },
    /// 200 with these extra header lines.
    WithHeaders(Vec<(String, String)>),
    /// 200 with Content-Length and this body instead of the batch's document.
    Custom(Bytes),
    /// 200 with Content-Length, this body and these extra header lines.
    CustomWithHeaders(Bytes, Vec<(String, String)>),
    /// These exact bytes as the response (malformed framing on purpose), then close.
    RawResponse(Vec<u8>),
    /// Waits, then behaves as the inner behaviour.
    Delayed(Duration, Box<Behavior>),
}

/// A request as the origin received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct State {
    behaviors: HashMap<String, Behavior>,
    generations: HashMap<String, u64>,
    seen: Vec<Seen>,
    /// Behaviours for the next generations of an id, used once each, before `behaviors`.
    once: HashMap<String, std::collections::VecDeque<Behavior>>,
    /// Current document version per id (absent: 0, the plain `document(id)`).
    versions: HashMap<String, u32>,
    /// Every version generated per id (a generation records its version before answering).
    served: HashMap<String, std::collections::BTreeSet<u32>>,
    /// Ids whose answers carry `Set-Cookie: session=<x-test-client of the request>`.
    cookie_ids: std::collections::HashSet<String>,
    /// `(token, id)` of every Set-Cookie sent.
    cookies_sent: Vec<(String, String)>,
    /// While set, the access check (`/auth/…`) closes the connection without answering.
    auth_down: bool,
    /// Documents built so far, by id and version.
    docs: HashMap<(String, u32), Bytes>,
}

#[derive(Clone)]
pub struct TestOrigin {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// The body served for batch `id`: a results document of about `size_of(id)` bytes.
pub fn document(id: &str) -> Bytes {
    Bytes::from(lotecache::sample_origin::batch_document(id, lotecache::sample_origin::target_size(id)))
}

/// Version `version` of batch `id`'s document: version 0 is [`document`]; a later one (the
/// batch processed again) is the same document with a top-level `"revision"` member first.
pub fn versioned_document(id: &str, version: u32) -> Bytes {
    let doc = document(id);
    if version == 0 {
        return doc;
    }
    let mut out = format!("{{\"revision\":{version},").into_bytes();
    out.extend_from_slice(&doc[1..]);
    Bytes::from(out)
}

/// The batch id of a request target on either batch path (query string dropped).
fn batch_id(target: &str) -> Option<String> {
    let rest = target
        .strip_prefix("/download_batch_results/")
        .or_else(|| target.strip_prefix("/raw/download_batch_results/"))?;
    Some(rest.split('?').next().unwrap_or("").to_string())
}

impl TestOrigin {
    pub async fn start() -> TestOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin =
            TestOrigin { addr: listener.local_addr().unwrap(), state: Arc::default(), connections: Arc::default() };
        let o = origin.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                o.connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move { o.serve(stream).await });
            }
        });
        origin
    }

    pub fn set(&self, id: &str, behavior: Behavior) {
        self.state.lock().unwrap().behaviors.insert(id.to_string(), behavior);
    }

    /// How many times batch `id` was requested (generated).
    pub fn generations(&self, id: &str) -> u64 {
        self.state.lock().unwrap().generations.get(id).copied().unwrap_or(0)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The next generation of `id` behaves as `behavior` (queued after earlier ones), then
    /// the set behaviour applies again.
    pub fn push_once(&self, id: &str, behavior: Behavior) {
        self.state.lock().unwrap().once.entry(id.to_string()).or_default().push_back(behavior);
    }

    /// One-shot behaviours of `id` not used yet.
    pub fn pending_once(&self, id: &str) -> usize {
        self.state.lock().unwrap().once.get(id).map_or(0, |q| q.len())
    }

    /// The batch is processed again: later generations of `id` serve a new version. Returns it.
    pub fn bump_version(&self, id: &str) -> u32 {
        let mut st = self.state.lock().unwrap();
        let v = st.versions.entry(id.to_string()).or_default();
        *v += 1;
        *v
    }

    /// The versions of `id` generated so far (a generation counts even if its body was cut).
    pub fn served_versions(&self, id: &str) -> Vec<u32> {
        self.state.lock().unwrap().served.get(id).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// Version `version` of `id`'s document (built once, then kept).
    pub fn document_version(&self, id: &str, version: u32) -> Bytes {
        let key = (id.to_string(), version);
        if let Some(d) = self.state.lock().unwrap().docs.get(&key) {
            return d.clone();
        }
        let doc = versioned_document(id, version);
        self.state.lock().unwrap().docs.insert(key, doc.clone());
        doc
    }

    /// Turns the per-request cookie of `id` on or off: while on, every answer for `id` carries
    /// `Set-Cookie: session=<token>`, the token being the request's `x-test-client` header, or
    /// when the request has none, `g<n>-<id>`, unique to this answer.
    pub fn set_request_cookie(&self, id: &str, on: bool) {
        let mut st = self.state.lock().unwrap();
        if on {
            st.cookie_ids.insert(id.to_string());
        } else {
            st.cookie_ids.remove(id);
        }
    }

    /// Which id's answer the cookie `token` was sent with, if it was sent.
    pub fn cookie_sent_for(&self, token: &str) -> Option<String> {
        self.state.lock().unwrap().cookies_sent.iter().find(|(t, _)| t == token).map(|(_, id)| id.clone())
    }

    /// Takes the access check (`/auth/…`) down (it closes connections unanswered) or up.
    pub fn set_auth_down(&self, down: bool) {
        self.state.lock().unwrap().auth_down = down;
    }

    /// How many access checks (`/auth/…`) reached the origin.
    pub fn auth_checks(&self) -> usize {
        self.state.lock().unwrap().seen.iter().filter(|s| s.target.starts_with("/auth/")).count()
    }

    /// How many Set-Cookie headers were sent.
    pub fn cookies_sent(&self) -> usize {
        self.state.lock().unwrap().cookies_sent.len()
    }

    async fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream);
        loop {
            let Some(req) = read_request(&mut reader).await else {
                return;
            };
            self.state.lock().unwrap().seen.push(req.clone());
            let keep = match batch_id(&req.target) {
                Some(id) => {
                    let token = req.headers.iter().find(|(k, _)| k == "x-test-client").map(|(_, v)| v.clone());
                    let (behavior, version, cookie) = {
                        let mut st = self.state.lock().unwrap();
                        *st.generations.entry(id.clone()).or_default() += 1;
                        let once = st.once.get_mut(&id).and_then(|q| q.pop_front());
                        let behavior = once.or_else(|| st.behaviors.get(&id).cloned());
                        let version = st.versions.get(&id).copied().unwrap_or(0);
                        st.served.entry(id.clone()).or_default().insert(version);
                        // The request's own token when it came through; else one made
                        // for this generation alone (`g<n>-<id>`).
                        let cookie = if st.cookie_ids.contains(&id) {
                            let n = st.cookies_sent.len();
                            let t = token.unwrap_or_else(|| format!("g{n}-{id}"));
                            st.cookies_sent.push((t.clone(), id.clone()));
                            Some(t)
                        } else {
                            None
                        };
                        (behavior, version, cookie)
                    };
                    let behavior =
                        behavior.unwrap_or(Behavior::Ok { delay: Duration::ZERO, pieces: 1, gap: Duration::ZERO });
                    let doc = self.document_version(&id, version);
                    let extra = cookie.map(|t| format!("set-cookie: session={t}\r\n")).unwrap_or_default();
                    respond_batch(reader.get_mut(), &id, &doc, &extra, behavior, req.method == "HEAD").await
                }
                None if req.target.starts_with("/auth/") => {
                    if self.state.lock().unwrap().auth_down {
                        return;
                    }
                    auth(reader.get_mut(), &req).await
                }
                None => echo(reader.get_mut(), &req).await,
            };
            if !keep {
                return;
            }
        }
    }
}

async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Seen> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if let Some(len) = header("content-length") {
        body.resize(len.parse().ok()?, 0);
        reader.read_exact(&mut body).await.ok()?;
    } else if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).await.ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(Seen { method, target, headers, body })
}

fn head(status: u16, extra: &str) -> String {
    format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}\r\n")
}

/// Writes the answer for a batch, `doc` being its document and `always` header lines every
/// answer carries; returns whether the connection may be reused.
async fn respond_batch(
    s: &mut TcpStream,
    id: &str,
    doc: &Bytes,
    always: &str,
    mut behavior: Behavior,
    head_only: bool,
) -> bool {
    while let Behavior::Delayed(delay, inner) = behavior {
        tokio::time::sleep(delay).await;
        behavior = *inner;
    }
    let disposition = format!("content-disposition: attachment; filename={id}_resultados.json\r\n{always}");
    let with_len = |extra: &str| head(200, &format!("{disposition}content-length: {}\r\n{extra}", doc.len()));
    match behavior {
        Behavior::Ok { delay, pieces, gap } => {
            tokio::time::sleep(delay).await;
            if s.write_all(with_len("").as_bytes()).await.is_err() {
                return false;
            }
            if head_only {
                return true;
            }
            let piece = doc.len().div_ceil(pieces.max(1));
            for (i, chunk) in doc.chunks(piece).enumerate() {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                if s.write_all(chunk).await.is_err() {
                    return false;
                }
            }
            true
        }
        Behavior::Chunked | Behavior::ChunkedNoEnd => {
            let mut out = head(200, &format!("{disposition}transfer-encoding: chunked\r\n")).into_bytes();
            for chunk in doc.chunks(1000) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            let complete = matches!(behavior, Behavior::Chunked);
            if complete {
                out.extend_from_slice(b"0\r\n\r\n");
            }
            let _ = s.write_all(&out).await;
            complete
        }
        Behavior::ChunkedCut { send } => {
            let mut out = head(200, &format!("{disposition}transfer-encoding: chunked\r\n")).into_bytes();
            let mut left = send.min(doc.len());
            for chunk in doc.chunks(1000) {
                if left == 0 {
                    break;
                }
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                let n = left.min(chunk.len());
                out.extend_from_slice(&chunk[..n]);
                left -= n;
                if n == chunk.len() {
                    out.extend_from_slice(b"\r\n");
                }
            }
            let _ = s.write_all(&out).await;
            false
        }
        Behavior::CutShort { send } => {
            let _ = s.write_all(with_len("").as_bytes()).await;
            let _ = s.write_all(&doc[..send.min(doc.len())]).await;
            false
        }
        Behavior::CloseDelimited { send } => {
            let _ = s.write_all(head(200, &format!("{disposition}connection: close\r\n")).as_bytes()).await;
            let _ = s.write_all(&doc[..send.unwrap_or(doc.len()).min(doc.len())]).await;
            false
        }
        Behavior::Status(code) => {
            let body = format!("{{\"error\":\"status {code}\"}}");
            let _ = s.write_all(head(code, &format!("{always}content-length: {}\r\n", body.len())).as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            true
        }
        Behavior::Refuse => false,
        Behavior::RawResponse(bytes) => {
            let _ = s.write_all(&bytes).await;
            false
        }
        Behavior::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            false
        }
        Behavior::StallMidBody { stall } => {
            let _ = s.write_all(with_len("").as_bytes()).await;
            let _ = s.write_all(&doc[..doc.len() / 2]).await;
            tokio::time::sleep(stall).await;
            let _ = s.write_all(&doc[doc.len() / 2..]).await;
            true
        }
        Behavior::Delayed(..) => unreachable!("unwrapped above"),
        Behavior::Custom(body) => {
            let head = head(200, &format!("{disposition}content-length: {}\r\n", body.len()));
            s.write_all(head.as_bytes()).await.is_ok() && s.write_all(&body).await.is_ok()
        }
        Behavior::CustomWithHeaders(body, extra) => {
            let extra: String = extra.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
            let head = head(200, &format!("{disposition}content-length: {}\r\n{extra}", body.len()));
            s.write_all(head.as_bytes()).await.is_ok() && s.write_all(&body).await.is_ok()
        }
        Behavior::WithHeaders(extra) => {
            let extra: String = extra.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
            let _ = s.write_all(with_len(&extra).as_bytes()).await;
            let _ = s.write_all(doc).await;
            true
        }
    }
}

/// An access check: cookie `user=ok` may (204), `user=nope` may not (403), none is 401.
/// The access check: `user=ok` in the cookie allows, `user=nope` gets 403, else 401. A cookie
/// `cc=<value>` (`+` for spaces) adds `Cache-Control: <value>` to the answer, and `sc=<value>`
/// a `Set-Cookie: <value>`.
async fn auth(s: &mut TcpStream, req: &Seen) -> bool {
    let cookie = req.headers.iter().find(|(k, _)| k == "cookie").map(|(_, v)| v.as_str()).unwrap_or("");
    let cc = cookie
        .split(';')
        .find_map(|c| c.trim().strip_prefix("cc="))
        .map(|v| format!("cache-control: {}\r\n", v.replace('+', " ")))
        .unwrap_or_default()
        + &cookie
            .split(';')
            .find_map(|c| c.trim().strip_prefix("sc="))
            .map(|v| format!("set-cookie: {v}\r\n"))
            .unwrap_or_default();
    let out = if cookie.contains("user=ok") {
        format!("HTTP/1.1 204 No Content\r\n{cc}\r\n")
    } else if cookie.contains("user=nope") {
        let body = r#"{"error":"forbidden","detail":"no access to this batch"}"#;
        format!(
            "HTTP/1.1 403 Forbidden\r\n{cc}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Cookie realm=\"ocr\"\r\ncontent-length: 0\r\n\r\n".to_string()
    };
    s.write_all(out.as_bytes()).await.is_ok()
}

/// Answers any other request with a JSON description of what was received.
async fn echo(s: &mut TcpStream, req: &Seen) -> bool {
    let body = serde_json::json!({
        "method": req.method,
        "target": req.target,
        "headers": req.headers,
        "body": String::from_utf8_lossy(&req.body),
    })
    .to_string();
    let out = format!("{}{body}", head(200, &format!("x-origin: echo\r\ncontent-length: {}\r\n", body.len())));
    s.write_all(out.as_bytes()).await.is_ok()
}
