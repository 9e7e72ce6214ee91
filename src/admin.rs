//! The admin listener, separate from the proxy port: health, readiness, Prometheus metrics,
//! the cache page (`GET /`, `assets/admin.html`) and its figures (`GET /stats`), entry listing
//! (sorted, searched, paginated) and inspection, and (with a bearer token) removal, purge,
//! warm and GC.

use crate::body::{full, ProxyBody};
use crate::cache::status::Outcome;
use crate::cache::store::{EntrySummary, Purge, SortBy, StoreError};
use crate::proxy::ProxyState;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, UNIX_EPOCH},
};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token for mutating endpoints (`LOTECACHE_ADMIN_TOKEN` overrides the file).
    pub token: Option<String>,
}

/// How recently the origin must have answered for `/readyz` to skip a connect probe.
const ORIGIN_RECENT: Duration = Duration::from_secs(30);
const MAX_BODY: usize = 64 * 1024;

/// The admin API's state.
pub struct Admin {
    state: Arc<ProxyState>,
    /// Bearer token for mutating endpoints; None refuses them. Replaced on reload.
    token: ArcSwap<Option<String>>,
}

impl Admin {
    pub fn new(state: Arc<ProxyState>, token: Option<String>) -> Arc<Admin> {
        Arc::new(Admin { state, token: ArcSwap::from_pointee(token) })
    }

    pub fn set_token(&self, token: Option<String>) {
        self.token.store(Arc::new(token));
    }

    /// Answers one admin request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let segments: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, [""]) => page(),
            // Both walk every entry: on a blocking thread, not the one that accepts connections.
            (&Method::GET, ["stats"]) => {
                let this = self.clone();
                match tokio::task::spawn_blocking(move || this.stats()).await {
                    Ok(stats) => reply(StatusCode::OK, stats),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "stats failed", &e.to_string()),
                }
            }
            (&Method::GET, ["healthz"]) => reply(StatusCode::OK, json!({ "status": "ok" })),
            (&Method::GET, ["readyz"]) => self.readyz().await,
            (&Method::GET, ["metrics"]) => {
                let mut resp = Response::new(full(self.state.metrics.render()));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8".parse().expect("static"));
                resp
            }
            (&Method::GET, ["entries"]) => {
                let (this, query) = (self.clone(), req.uri().query().unwrap_or("").to_string());
                match tokio::task::spawn_blocking(move || this.list(&query)).await {
                    Ok(resp) => resp,
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "list failed", &e.to_string()),
                }
            }
            (&Method::GET, ["entries", key]) => match self.state.cache.store.lookup(&decode(key)).await {
                Ok(Some(e)) => reply(StatusCode::OK, entry_json(&EntrySummary::from(e.as_ref()))),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "store unreadable", &e.to_string()),
                Ok(None) => {
                    error(StatusCode::NOT_FOUND, "no such entry", &format!("no entry under key {:?}", decode(key)))
                }
            },
            (&Method::DELETE, ["entries", key]) => {
                if let Some(refusal) = self.refuse_unauthorized(&req) {
                    return refusal;
                }
                self.purge(Purge::Key(decode(key)), false).await
            }
            (&Method::POST, ["purge"]) => {
                if let Some(refusal) = self.refuse_unauthorized(&req) {
                    return refusal;
                }
                match read_json(req).await {
                    Ok(v) => {
                        let rewarm = v.get("rewarm") == Some(&Value::Bool(true));
                        match purge_request(&v) {
                            Some(Purge::All) if rewarm => error(
                                StatusCode::BAD_REQUEST,
                                "bad purge request",
                                "rewarm needs a lote_id or a key: a purge of everything is not warmed again",
                            ),
                            Some(which) => self.purge(which, rewarm).await,
                            None => error(
                                StatusCode::BAD_REQUEST,
                                "bad purge request",
                                r#"send {"lote_id": "..."}, {"key": "..."} or {"all": true}, with "rewarm": true to fetch the batch again at once"#,
                            ),
                        }
                    }
                    Err(detail) => error(StatusCode::BAD_REQUEST, "bad purge request", &detail),
                }
            }
            (&Method::POST, ["warm"]) => {
                if let Some(refusal) = self.refuse_unauthorized(&req) {
                    return refusal;
                }
                match read_json(req).await.and_then(|v| warm_request(&v)) {
                    Ok(ids) => reply(StatusCode::ACCEPTED, json!({ "warmed": self.warm(&ids) })),
                    Err(detail) => error(StatusCode::BAD_REQUEST, "bad warm request", &detail),
                }
            }
            (&Method::POST, ["gc"]) => {
                if let Some(refusal) = self.refuse_unauthorized(&req) {
                    return refusal;
                }
                match self.state.cache.store.gc().await {
                    Ok(report) => reply(StatusCode::OK, serde_json::to_value(report).expect("report")),
                    Err(e @ StoreError::Loading) => {
                        error(StatusCode::SERVICE_UNAVAILABLE, "gc not run", &e.to_string())
                    }
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "gc failed", &e.to_string()),
                }
            }
            (_, ["" | "stats" | "healthz" | "readyz" | "metrics" | "entries" | "purge" | "warm" | "gc", ..]) => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", &format!("{method} is not supported here"))
            }
            _ => error(StatusCode::NOT_FOUND, "not found", "see README.md, Operations, for the admin endpoints"),
        }
    }

    async fn readyz(&self) -> Response<ProxyBody> {
        let origin = self.state.origin.reachable(ORIGIN_RECENT).await;
        let mut body = json!({
            "ready": origin,
            "store": "open",
            "origin": if origin { "reachable" } else { "unreachable" },
            "fills_in_flight": self.state.cache.fills.len(),
            // Serving does not wait for it: a key not loaded yet is read from its bucket.
            "index": self.state.cache.store.load_progress(),
        });
        // The shared store's state is reported, not required: without it this replica still
        // serves from its own tier and the origin. It is the state the last operation or the
        // background probe found: a health check never waits on a hanging store.
        if let Some(s) = self.state.cache.fills.shared() {
            let (up, last_error) = s.state();
            let state = match (up, &last_error) {
                (true, _) => "reachable",
                (false, Some(_)) => "unreachable",
                (false, None) => "unknown",
            };
            body["shared_store"] = json!({
                "location": s.location(),
                "state": state,
                "last_error": last_error,
                "uploads_pending": s.uploads_pending(),
            });
        }
        reply(if origin { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
    }

    /// `GET /entries?offset=&limit=&sort=&order=&q=`: a page of the entries, sorted by `sort`
    /// (`key`, `lote_id`, `size`, `stored_at`, `hits`, `last_hit`, `generation_ms`; default
    /// `key`) in `order` (`asc`, `desc`), of those whose key or lote id contains `q` (any case).
    /// `total` counts the entries that match.
    fn list(&self, query: &str) -> Response<ProxyBody> {
        // Form encoding, as a browser's URLSearchParams writes it: `+` is a space.
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| decode(&v.replace('+', " ")))
        };
        let offset = param("offset").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        let limit = param("limit").and_then(|v| v.parse::<usize>().ok()).unwrap_or(100).clamp(1, 1000);
        let sort = param("sort").unwrap_or_else(|| "key".into());
        let descending = match param("order").as_deref() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(_) => return error(StatusCode::BAD_REQUEST, "bad list request", "order is asc or desc"),
        };
        let sort = match sort.as_str() {
            "key" => SortBy::Key,
            "lote_id" => SortBy::LoteId,
            "size" => SortBy::Size,
            "stored_at" => SortBy::StoredAt,
            "hits" => SortBy::Hits,
            "last_hit" => SortBy::LastHit,
            "generation_ms" => SortBy::GenMs,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad list request",
                    "sort is one of key, lote_id, size, stored_at, hits, last_hit, generation_ms",
                )
            }
        };
        let q = param("q");
        let (total, entries) = self.state.cache.store.list(q.as_deref(), sort, descending, offset, limit);
        let page: Vec<Value> = entries.iter().map(entry_json).collect();
        reply(StatusCode::OK, json!({ "total": total, "offset": offset, "limit": limit, "entries": page }))
    }

    /// `GET /stats`: the figures of the cache page, in JSON: requests by outcome, the hit
    /// ratio, the generations avoided and the origin time and bytes saved (since start), the
    /// store against its caps, fills in flight, the shared store's state, and per rule what
    /// its live entries hold.
    fn stats(&self) -> Value {
        let m = &self.state.metrics;
        let store = &self.state.cache.store;
        let outcomes: serde_json::Map<String, Value> =
            Outcome::ALL.iter().map(|&o| (o.label().to_string(), json!(m.outcome.of(o).get()))).collect();
        let count = |o: Outcome| m.outcome.of(o).get();
        let (hit, miss, collapsed, stale) =
            (count(Outcome::Hit), count(Outcome::Miss), count(Outcome::Collapsed), count(Outcome::Stale));
        let answered = hit + miss + collapsed + stale;
        let mut rules: std::collections::BTreeMap<std::sync::Arc<str>, (u64, u64, u64, u64, f64)> = Default::default();
        let mut entries = 0usize;
        store.for_each(|_, _, s| {
            entries += 1;
            let hits = s.state.hits.load(Relaxed);
            let r = match rules.get_mut(&*s.rule) {
                Some(r) => r,
                None => rules.entry(s.rule.clone()).or_default(),
            };
            r.0 += 1;
            r.1 += s.size;
            r.2 += s.stored_bytes();
            r.3 += hits;
            r.4 += hits as f64 * s.gen_ms as f64 / 1000.0;
        });
        let per_rule: Vec<Value> = rules
            .iter()
            .map(|(rule, (n, bytes, stored, hits, saved))| {
                json!({ "rule": &**rule, "entries": n, "bytes": bytes, "stored_bytes": stored, "hits": hits,
                        "origin_seconds_saved": saved })
            })
            .collect();
        let shared = self.state.cache.fills.shared().map(|s| {
            let (up, last_error) = s.state();
            json!({ "location": s.location(), "up": up, "last_error": last_error, "uploads_pending": s.uploads_pending() })
        });
        json!({
            "requests": outcomes,
            "hit_ratio": if answered > 0 { hit as f64 / answered as f64 } else { 0.0 },
            // A hit, a request that joined another's fetch, or one served stale: none made
            // the origin generate the batch.
            "generations_avoided": hit + collapsed + stale,
            "origin_seconds_saved": m.origin_seconds_saved.get(),
            "origin_bytes_saved": m.origin_bytes_saved.get(),
            "store": {
                "entries": entries,
                "bytes": store.bytes(),
                "index": store.load_progress(),
                "max_size": store.max_size(),
                "free_disk": store.free_bytes(),
                "memory_bytes": store.memory_bytes(),
            },
            "fills_in_flight": self.state.cache.fills.len(),
            "compressions_pending": self.state.cache.compressions_pending(),
            "shared_store": shared,
            "rules": per_rule,
        })
    }

    /// Removes entries locally and, with a shared store, their shared records and named
    /// copies (else another replica, or this one, would copy them back). The shared store
    /// goes first: a request in between would otherwise copy the document back here.
    ///
    /// With `rewarm`, the purged batch is then fetched again at once (see [`Admin::warm`]): a
    /// re-processed batch is generated once, before anyone asks; once the purge returns, no
    /// request gets the old document (one in between is a miss that joins the new fetch). Not
    /// after a shared removal that failed: that warm would copy the old record back.
    async fn purge(&self, which: Purge, rewarm: bool) -> Response<ProxyBody> {
        // The batch a purge of one key names, known before the entry goes.
        let rewarm_ids: Vec<String> = match (&which, rewarm) {
            (_, false) | (Purge::All, _) => Vec::new(),
            (Purge::LoteId(id), true) => vec![id.clone()],
            (Purge::Key(k), true) => {
                let stored = self.state.cache.store.lookup(k).await.ok().flatten().map(|e| e.lote_id.clone());
                stored.or_else(|| self.state.rules.load().lote_id_of_key(k)).into_iter().collect()
            }
        };
        // While the index loads, the keys named (or the rules give the batch) are brought into
        // memory first, so that the answer names them; others the load reaches later are
        // removed as it does (the store remembers the purge until then).
        if !self.state.cache.store.is_loaded() {
            let keys = match &which {
                Purge::Key(k) => vec![k.clone()],
                Purge::LoteId(id) => self.state.rules.load().keys_of(id),
                Purge::All => Vec::new(),
            };
            for k in keys {
                let _ = self.state.cache.store.lookup(&k).await;
            }
        }
        // First of all: fills and write-throughs already running see the purge from here on
        // and store nothing it covers; requests after it start fresh fills.
        self.state.cache.store.record_purge(&which);
        self.state.cache.fills.detach(&which);
        let shared = self.state.cache.fills.shared().cloned();
        let mut shared_result = None;
        if let Some(s) = &shared {
            // Keys this replica holds, plus the keys the rules give the batch: another
            // replica may have stored it.
            let store = &self.state.cache.store;
            let mut keys: Vec<String> = match &which {
                Purge::Key(k) => vec![k.clone()],
                Purge::LoteId(id) => {
                    let mut k = self.state.rules.load().keys_of(id);
                    k.extend(store.keys_of(&which));
                    k
                }
                Purge::All => store.keys_of(&which),
            };
            keys.sort();
            keys.dedup();
            let mut removed = Vec::new();
            let mut failed = Vec::new();
            for k in keys {
                // While the store is down, the rest is not tried (each try waits its deadlines).
                if !failed.is_empty() {
                    failed.push(k);
                    continue;
                }
                match crate::cache::tier::Tier::remove(s, &k).await {
                    Ok(()) => removed.push(k),
                    Err(e) => {
                        tracing::warn!(key = %k, error = %e, "purge: shared record not removed");
                        failed.push(k);
                    }
                }
            }
            if matches!(which, Purge::All) && failed.is_empty() {
                match s.remove_all_records().await {
                    Ok(n) => tracing::info!(records = n, "purge: every shared record removed"),
                    Err(e) => failed.push(format!("(all records: {e})")),
                }
            }
            shared_result = Some((removed, failed));
        }
        match self.state.cache.store.purge(which.clone()).await {
            Ok(removed) if removed.is_empty() && matches!(which, Purge::Key(_)) && shared.is_none() => {
                error(StatusCode::NOT_FOUND, "no such entry", "nothing was removed")
            }
            Ok(removed) => {
                let mut body = json!({ "removed": removed });
                if !self.state.cache.store.is_loaded() {
                    // `removed` names what memory held; the load removes the rest it covers.
                    body["index_loading"] = json!(true);
                }
                // Not after a shared removal that failed: the warm would copy the old record
                // straight back.
                let shared_ok = shared_result.as_ref().is_none_or(|(_, failed)| failed.is_empty());
                if rewarm && shared_ok {
                    body["rewarmed"] = json!(self.warm(&rewarm_ids));
                } else if rewarm {
                    body["rewarmed"] = json!([]);
                }
                let mut status = StatusCode::OK;
                if let Some((shared_removed, failed)) = shared_result {
                    body["shared_removed"] = json!(shared_removed);
                    if !failed.is_empty() {
                        body["shared_failed"] = json!(failed);
                        status = StatusCode::BAD_GATEWAY;
                    }
                }
                reply(status, body)
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "purge failed", &e.to_string()),
        }
    }

    /// Starts, for each id and each rule, the fill of that batch unless it is stored or being
    /// fetched (see [`crate::cache::Cache::warm`]); what each did.
    fn warm(&self, ids: &[String]) -> Vec<Value> {
        let rules = self.state.rules.load();
        let mut out = Vec::new();
        for id in ids {
            for (rule, target) in rules.warm_targets(id) {
                let (result, detail) = match target {
                    Ok(t) => match self.state.cache.warm(&t) {
                        crate::cache::Warmed::Busy(why) => ("busy", Some(why)),
                        w => (w.token(), None),
                    },
                    Err(why) => ("refused", Some(why)),
                };
                tracing::info!(lote_id = %id, rule = %rule, result, "warm");
                let mut one = json!({ "lote_id": id, "rule": rule, "result": result });
                if let Some(d) = detail {
                    one["detail"] = json!(d);
                }
                out.push(one);
            }
        }
        out
    }

    /// Mutating endpoints need `Authorization: Bearer <token>`; the token is compared in
    /// constant time (digests of equal length), and refused outright when none is set.
    /// The refusal to send, or None when the request carries the right token.
    fn refuse_unauthorized(&self, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
        let token = self.token.load();
        let Some(expected) = token.as_ref() else {
            return Some(error(
                StatusCode::FORBIDDEN,
                "admin token not configured",
                "set LOTECACHE_ADMIN_TOKEN, or admin.token in the config file, to enable this endpoint",
            ));
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected.as_bytes())).into();
        if ok && !given.is_empty() {
            return None;
        }
        tracing::warn!(path = %req.uri().path(), "admin request with a missing or wrong token");
        let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <admin token>");
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
        Some(resp)
    }
}

/// The ids of a warm request: `{"lote_id": "…"}` or `{"lote_ids": ["…", …]}`.
fn warm_request(v: &Value) -> Result<Vec<String>, String> {
    const MAX_IDS: usize = 1000;
    let usage = r#"send {"lote_id": "..."} or {"lote_ids": ["...", ...]}"#;
    let ids: Vec<String> = match (v.get("lote_id"), v.get("lote_ids")) {
        (Some(Value::String(id)), None) => vec![id.clone()],
        (None, Some(Value::Array(list))) if !list.is_empty() => list
            .iter()
            .map(|i| i.as_str().map(String::from).ok_or_else(|| format!("every lote id is a string: {usage}")))
            .collect::<Result<_, _>>()?,
        _ => return Err(usage.into()),
    };
    if ids.len() > MAX_IDS {
        return Err(format!("at most {MAX_IDS} ids per request"));
    }
    Ok(ids)
}

fn purge_request(v: &Value) -> Option<Purge> {
    if let Some(id) = v.get("lote_id").and_then(Value::as_str) {
        return Some(Purge::LoteId(id.to_string()));
    }
    if let Some(key) = v.get("key").and_then(Value::as_str) {
        return Some(Purge::Key(key.to_string()));
    }
    (v.get("all") == Some(&Value::Bool(true))).then_some(Purge::All)
}

async fn read_json(req: Request<Incoming>) -> Result<Value, String> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("cannot read the body: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("the body is not JSON: {e}"))
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn rfc3339(ms: u128) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
}

/// An entry as the admin API and `cache ls --json` show it.
pub fn entry_json(e: &EntrySummary) -> Value {
    let etag = |sha256: &[u8; 32]| format!("\"sha256-{}\"", hex::encode(sha256));
    json!({
        "key": e.key,
        "lote_id": e.lote_id,
        "size": e.size,
        "sha256": hex::encode(e.sha256),
        "etag": etag(&e.sha256),
        "stored_at": rfc3339(e.stored_at_ms as u128),
        "last_hit": (e.hits > 0).then(|| rfc3339(e.last_hit_ms as u128)),
        "hits": e.hits,
        "generation_ms": e.gen_ms,
        "variants": e.variants.iter().map(|v| json!({
            "encoding": v.coding.token(),
            "size": v.size,
            "sha256": hex::encode(v.sha256),
            "etag": etag(&v.sha256),
            "hits": v.hits,
        })).collect::<Vec<_>>(),
    })
}

/// The cache page: one self-contained file (no external asset), its script confined by a
/// Content-Security-Policy to this origin.
fn page() -> Response<ProxyBody> {
    const PAGE: &str = include_str!("../assets/admin.html");
    let mut resp = Response::new(full(Bytes::from_static(PAGE.as_bytes())));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, "text/html; charset=utf-8".parse().expect("static"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            .parse()
            .expect("static"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, "nosniff".parse().expect("static"));
    h.insert(header::REFERRER_POLICY, "no-referrer".parse().expect("static"));
    h.insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
    resp
}

fn reply(status: StatusCode, body: Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("static"));
    resp
}

fn error(status: StatusCode, error: &str, detail: &str) -> Response<ProxyBody> {
    tracing::info!(status = status.as_u16(), error, detail, "admin request refused");
    reply(status, json!({ "error": error, "detail": detail }))
}
