//! The access check of a rule with `[rules.auth]`: a sub-request to the backend carrying the
//! client's credentials asks whether this client may have this batch, and its answer is kept
//! for a short while (the decision cache), so that hits do not each cost the backend a request.
//!
//! - A decision is keyed by a sha256 of the rule, its check URL, the batch id, the client's
//!   address (the check sees it as `X-Forwarded-For`) and the exact credential headers (names
//!   and values, in order), each field length-prefixed: never the raw values.
//!   Two clients share a decision only when they send the same credentials for the same batch
//!   from the same address.
//! - An allow is kept for `cache_ttl`, a refusal (401/403, kept with its body to answer again,
//!   without its per-request headers such as `Set-Cookie`) for `deny_ttl`; a
//!   `Cache-Control: max-age=N` on the check's answer shortens that to N, and `no-store` or
//!   `no-cache` keeps nothing. A TTL of 0 keeps nothing of that kind. A kept decision never
//!   outlives the TTL configured now (a reload that shortens it applies at once). The cache is
//!   bounded in entries per rule (least recently used dropped first). Purges and warms do not
//!   touch it: revoking a user's access takes effect within `cache_ttl`.
//! - A check that fails (backend unreachable, timeout, an answer other than 2xx/401/403) is
//!   never kept, and fails closed (`502`): a decision kept within its TTL still serves while
//!   the backend is down, and the response says so in `Cache-Status` (`access=cached`).

use crate::body::{empty, full, ProxyBody};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::origin::Origin;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::status::CacheStatus;
use super::target::{AuthCheck, CacheTarget};

/// Largest access-check answer read (its body is discarded, or passed on when it refuses).
const ANSWER_MAX: usize = 64 * 1024;

/// What the check decided for one request.
pub enum Access {
    /// Serve it; `cached`: the decision was kept from an earlier check.
    Allowed { cached: bool },
    /// Send this instead (the backend's refusal, or `502`).
    Refused(Response<ProxyBody>),
}

/// A kept decision.
#[derive(Clone)]
struct Decision {
    kept_at: Instant,
    /// How long it was kept for (at most the configured TTL of its kind then).
    ttl: Duration,
    /// None: allowed; otherwise the refusal as the backend sent it.
    refusal: Option<Arc<Refusal>>,
}

impl Decision {
    /// Whether it still holds now, under the TTL configured now.
    fn holds(&self, auth: &AuthCheck, now: Instant) -> bool {
        let configured = if self.refusal.is_some() { auth.deny_ttl } else { auth.cache_ttl };
        now.saturating_duration_since(self.kept_at) < self.ttl.min(configured)
    }
}

struct Refusal {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

type Decisions = Mutex<lru::LruCache<[u8; 32], Decision>>;

/// The decision caches of every rule with an access check, by rule name (a rule renamed by a
/// reload leaves one behind, bounded like any other).
#[derive(Default)]
pub struct AccessChecks {
    by_rule: std::sync::RwLock<HashMap<String, Arc<Decisions>>>,
}

impl AccessChecks {
    /// The decisions of `rule` (made on first use; sized on each use, under their own lock).
    fn decisions(&self, rule: &str, entries: usize) -> Arc<Decisions> {
        if let Some(d) = self.by_rule.read().expect("access decisions lock").get(rule) {
            return d.clone();
        }
        let cap = NonZeroUsize::new(entries.max(1)).expect("at least one");
        let mut by_rule = self.by_rule.write().expect("access decisions lock");
        by_rule.entry(rule.to_string()).or_insert_with(|| Arc::new(Mutex::new(lru::LruCache::new(cap)))).clone()
    }

    /// Decides whether `client` may be served `target`'s batch.
    pub async fn check(
        &self,
        origin: &Origin,
        metrics: &Metrics,
        client: &HeaderMap,
        target: &CacheTarget,
        auth: &AuthCheck,
        peer: SocketAddr,
    ) -> Access {
        let caching = !auth.cache_ttl.is_zero() || !auth.deny_ttl.is_zero();
        let key = decision_key(target, auth, client, peer);
        let decisions = caching.then(|| self.decisions(&target.rule, auth.cache_entries));
        if let Some(d) = &decisions {
            let kept = {
                let mut cache = d.lock().expect("decision cache lock");
                let cap = NonZeroUsize::new(auth.cache_entries.max(1)).expect("at least one");
                if cache.cap() != cap {
                    cache.resize(cap);
                }
                cache.get(&key).cloned()
            };
            if let Some(kept) = kept.filter(|k| k.holds(auth, Instant::now())) {
                let result = if kept.refusal.is_some() { "deny" } else { "allow" };
                metrics.access_checks.with_label_values(&[result, "cached"]).inc();
                return match kept.refusal {
                    None => Access::Allowed { cached: true },
                    Some(r) => {
                        let mut resp = r.response();
                        mark_access_cached(&mut resp);
                        Access::Refused(resp)
                    }
                };
            }
        }
        let started = Instant::now();
        let asked = ask(origin, client, target, auth, peer).await;
        metrics.access_check_seconds.observe(started.elapsed().as_secs_f64());
        let (refusal, ttl, configured) = match asked {
            Asked::Failed(resp) => {
                metrics.access_checks.with_label_values(&["error", "asked"]).inc();
                return Access::Refused(resp);
            }
            Asked::Allowed { max_age } => {
                (None, max_age.map_or(auth.cache_ttl, |m| m.min(auth.cache_ttl)), auth.cache_ttl)
            }
            Asked::Refused { refusal, max_age } => {
                (Some(refusal), max_age.map_or(auth.deny_ttl, |m| m.min(auth.deny_ttl)), auth.deny_ttl)
            }
        };
        let result = if refusal.is_some() { "deny" } else { "allow" };
        metrics.access_checks.with_label_values(&[result, "asked"]).inc();
        // A kind of decision whose TTL is 0 is never kept, whatever the answer says; its
        // time runs from the question, not the answer.
        if let Some(d) = decisions.filter(|_| !configured.is_zero() && !ttl.is_zero()) {
            let kept_refusal = refusal.as_ref().map(|(r, _)| r.clone());
            let kept = Decision { kept_at: started, ttl, refusal: kept_refusal };
            d.lock().expect("decision cache lock").put(key, kept);
        }
        match refusal {
            None => Access::Allowed { cached: false },
            Some((r, own)) => {
                // This request's own per-request headers (never kept for others).
                let mut resp = r.response();
                for (name, value) in &own {
                    resp.headers_mut().append(name.clone(), value.clone());
                }
                Access::Refused(resp)
            }
        }
    }
}

impl Refusal {
    /// The refusal as the backend sent it, said to be an access denial.
    fn response(&self) -> Response<ProxyBody> {
        let mut resp = Response::new(full(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        CacheStatus::Rejected("access-denied".into()).set_on(&mut resp);
        resp
    }
}

/// Appends `access=cached` to a response's `Cache-Status`: it was served on a kept decision.
pub fn mark_access_cached(resp: &mut Response<ProxyBody>) {
    let Some(v) = resp.headers().get(super::status::CACHE_STATUS) else { return };
    // The common case without formatting: a hit.
    if v == "lotecache; hit" {
        resp.headers_mut()
            .insert(super::status::CACHE_STATUS, HeaderValue::from_static("lotecache; hit; access=cached"));
        return;
    }
    let Ok(v) = v.to_str() else { return };
    if let Ok(marked) = HeaderValue::from_str(&format!("{v}; access=cached")) {
        resp.headers_mut().insert(super::status::CACHE_STATUS, marked);
    }
}

/// The decision cache's key for this client and batch: a digest, so no credential is kept.
/// Every field is length-prefixed, so no two different inputs read the same.
fn decision_key(target: &CacheTarget, auth: &AuthCheck, client: &HeaderMap, peer: SocketAddr) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(target.rule.as_bytes());
    field(auth.url.as_bytes());
    field(target.lote_id.as_bytes());
    match peer.ip() {
        std::net::IpAddr::V4(ip) => field(&ip.octets()),
        std::net::IpAddr::V6(ip) => field(&ip.octets()),
    }
    for name in &target.headers.credentials {
        for v in client.get_all(name) {
            field(name.as_str().as_bytes());
            field(v.as_bytes());
        }
    }
    h.finalize().into()
}

/// What the backend answered.
enum Asked {
    Allowed {
        max_age: Option<Duration>,
    },
    /// The refusal to keep (without per-request headers), and this request's own ones.
    Refused {
        refusal: (Arc<Refusal>, HeaderMap),
        max_age: Option<Duration>,
    },
    /// The check could not decide: the `502` to send.
    Failed(Response<ProxyBody>),
}

/// How long the check's answer says it may be kept: `Some(0)` for `no-store`/`no-cache`,
/// `Some(N)` for `max-age=N`, None when it says nothing.
fn answer_max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut max_age = None;
    for d in headers.get_all(header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')) {
        let d = d.trim();
        if d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("no-cache") {
            return Some(Duration::ZERO);
        }
        if let Some((k, v)) = d.split_once('=') {
            if k.trim().eq_ignore_ascii_case("max-age") {
                max_age =
                    v.trim().trim_matches('"').parse::<u64>().ok().map(Duration::from_secs).or(Some(Duration::ZERO));
            }
        }
    }
    max_age
}

/// Asks the backend: the client's credentials, `X-Lote-Id`, the forwarding headers.
async fn ask(origin: &Origin, client: &HeaderMap, target: &CacheTarget, auth: &AuthCheck, peer: SocketAddr) -> Asked {
    let failed = |detail: String| {
        let err = ProxyError::AccessCheckFailed { detail };
        Asked::Failed(err.to_response(Some(CacheStatus::Rejected(err.token()))))
    };
    let id = super::target::encode_id(&target.lote_id);
    let mut headers = HeaderMap::new();
    for name in &target.headers.credentials {
        for v in client.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    crate::headers::forward_request_headers(&mut headers, peer);
    if let Ok(v) = HeaderValue::from_str(&target.lote_id) {
        headers.insert("x-lote-id", v);
    }
    let mut check = Request::new(empty());
    *check.headers_mut() = headers;
    let url = auth.url.replace("{lote_id}", &id);
    // A path is on the origin; anything else is an absolute URL.
    let uri = if url.starts_with('/') {
        origin.uri(&url).map_err(|e| e.detail())
    } else {
        url.parse::<http::Uri>().map_err(|e| e.to_string())
    };
    match uri {
        Ok(uri) => *check.uri_mut() = uri,
        Err(e) => return failed(format!("bad access check URL: {e}")),
    }
    match origin.subrequest(check, auth.timeout).await {
        Ok(resp) if resp.status().is_success() => {
            let max_age = answer_max_age(resp.headers());
            // Read the (small) answer to the end so its connection returns to the pool,
            // within limits: a check that streams without end must not hold the request.
            let body = http_body_util::Limited::new(resp.into_body(), ANSWER_MAX);
            let _ = tokio::time::timeout(auth.timeout, http_body_util::BodyExt::collect(body)).await;
            Asked::Allowed { max_age }
        }
        Ok(resp) if matches!(resp.status().as_u16(), 401 | 403) => {
            tracing::info!(lote_id = %target.lote_id, status = resp.status().as_u16(), "access check refused the request");
            let max_age = answer_max_age(resp.headers());
            // The refusal is passed on as the backend sent it, read whole within limits.
            let (mut parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, ANSWER_MAX);
            let collected = tokio::time::timeout(auth.timeout, http_body_util::BodyExt::collect(body)).await;
            let Ok(Ok(body)) = collected else {
                return failed(format!(
                    "the access check's {} answer was larger than {ANSWER_MAX} bytes or slower than its timeout",
                    parts.status
                ));
            };
            crate::headers::forward_response_headers(&mut parts.headers);
            let own = super::policy::take_per_request(&mut parts.headers);
            let body = body.to_bytes();
            parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            let refusal = Arc::new(Refusal { status: parts.status, headers: parts.headers, body });
            Asked::Refused { refusal: (refusal, own), max_age }
        }
        Ok(resp) => failed(format!("the access check answered {}", resp.status())),
        Err(e) => failed(e.detail()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_says_how_long_it_may_be_kept() {
        let cc = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CACHE_CONTROL, v.parse().unwrap());
            answer_max_age(&h)
        };
        assert_eq!(answer_max_age(&HeaderMap::new()), None);
        assert_eq!(cc("max-age=30"), Some(Duration::from_secs(30)));
        assert_eq!(cc("private, max-age=\"7\""), Some(Duration::from_secs(7)));
        assert_eq!(cc("no-store"), Some(Duration::ZERO));
        assert_eq!(cc("max-age=60, no-cache"), Some(Duration::ZERO));
        assert_eq!(cc("max-age=soon"), Some(Duration::ZERO));
        assert_eq!(cc("public"), None);
    }

    #[test]
    fn a_decision_key_depends_on_the_credentials_and_the_batch_but_holds_neither() {
        let target = |id: &str| CacheTarget {
            rule: "r".into(),
            lote_id: id.into(),
            key: format!("{id}_resultados.json"),
            origin_path: format!("/d/{id}"),
            validation: None,
            ttl: None,
            stale_if_error: true,
            access: super::super::target::AccessPolicy::Public,
            ignore: Default::default(),
            headers: Default::default(),
            max_object_size: None,
            compression: Default::default(),
        };
        let with = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(http::HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
            }
            h
        };
        let auth = AuthCheck {
            url: "/a/{lote_id}".into(),
            timeout: Duration::from_secs(1),
            cache_ttl: Duration::from_secs(5),
            deny_ttl: Duration::ZERO,
            cache_entries: 10,
        };
        let here: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let key = |id: &str, h: &HeaderMap| decision_key(&target(id), &auth, h, here);
        let ana = with(&[("cookie", "session=ana")]);
        let k = key("L1", &ana);
        assert_eq!(k, key("L1", &with(&[("cookie", "session=ana"), ("accept", "x")])));
        assert_eq!(
            k,
            decision_key(&target("L1"), &auth, &ana, "10.0.0.1:6000".parse().unwrap()),
            "the port is not who"
        );
        assert_ne!(k, key("L2", &ana));
        assert_ne!(k, key("L1", &with(&[("cookie", "session=luis")])));
        assert_ne!(k, key("L1", &with(&[("authorization", "session=ana")])));
        assert_ne!(k, key("L1", &HeaderMap::new()));
        assert_ne!(k, decision_key(&target("L1"), &auth, &ana, "10.0.0.2:5000".parse().unwrap()));
        let other_check = AuthCheck { url: "/b/{lote_id}".into(), ..auth.clone() };
        assert_ne!(k, decision_key(&target("L1"), &other_check, &ana, here));
        // Fields cannot run into each other: an id holding a header's bytes is another key.
        assert_ne!(key("L1cookiesession=ana", &HeaderMap::new()), key("L1", &ana));
        let hex = hex::encode(k);
        assert!(!hex.contains(&hex::encode("session=ana")));
    }
}
