//! The cache path of a request on a cache route: hit (verified read from the store) or
//! miss (join or start a fill, then stream from it).

pub mod entry;
pub mod fill;
pub mod policy;
pub mod read;
pub mod status;
pub mod store;

use crate::body::{empty, full, ProxyBody};
use crate::error::ProxyError;
use crate::origin::{forward_request_headers, Origin};
use crate::rules::CacheTarget;
use entry::Entry;
use fill::{subscriber_body, wait_head, FillJob, Fills, Lookup};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response};
use std::{net::SocketAddr, sync::Arc};
use store::Store;

/// Request headers never sent on a fill: a fill fetches the whole, identity-encoded
/// representation, whatever the request that started it asked for.
const NOT_FORWARDED_ON_FILL: [header::HeaderName; 7] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::ACCEPT_ENCODING,
];

/// The cache: its store, its fills in flight, and the origin it fills from.
pub struct Cache {
    pub store: Arc<Store>,
    pub fills: Arc<Fills>,
    origin: Origin,
}

impl Cache {
    pub fn new(store: Arc<Store>, origin: Origin) -> Self {
        Cache {
            store,
            fills: Arc::new(Fills::default()),
            origin,
        }
    }

    /// Answers a request on a cache route.
    pub async fn handle<B>(
        &self,
        req: Request<B>,
        target: CacheTarget,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let head_only = req.method() == Method::HEAD;
        if let Some(entry) = self.store.get(&target.key) {
            if let Some(resp) = self.serve_hit(entry, head_only).await {
                return resp;
            }
        }
        let lookup = self
            .fills
            .join_or_start(&self.store, &self.origin, &target.key, || {
                self.fill_job(&req, &target, peer)
            });
        let (fill, collapsed) = match lookup {
            Lookup::Stored(entry) => match self.serve_hit(entry, head_only).await {
                Some(resp) => return resp,
                // Evicted between commit and now: start over once.
                None => {
                    match self
                        .fills
                        .join_or_start(&self.store, &self.origin, &target.key, || {
                            self.fill_job(&req, &target, peer)
                        }) {
                        Lookup::Stored(_) => {
                            return ProxyError::FillAborted
                                .to_response(Some(status::miss_not_stored("store-race")))
                        }
                        Lookup::Joined(f) => (f, true),
                        Lookup::Started(f) => (f, false),
                    }
                }
            },
            Lookup::Joined(f) => (f, true),
            Lookup::Started(f) => (f, false),
        };

        let mut rx = fill.subscribe();
        let head = match wait_head(&mut rx).await {
            Ok(h) => h,
            Err(e) => return e.to_response(Some(status::miss_not_stored(e.token()))),
        };
        let mut resp = Response::new(if head_only {
            empty()
        } else {
            subscriber_body(rx)
        });
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers.clone();
        let cs = if collapsed {
            status::collapsed()
        } else {
            head.cache_status.clone()
        };
        resp.headers_mut().insert(status::CACHE_STATUS, cs);
        resp
    }

    /// Serves a stored entry; None if it turned out unreadable (it is then evicted and the
    /// caller fetches it again).
    async fn serve_hit(&self, entry: Arc<Entry>, head_only: bool) -> Option<Response<ProxyBody>> {
        let body = if head_only {
            match read::check_present(entry.clone()).await {
                Ok(()) => empty(),
                Err(e) => {
                    self.store.evict(&entry, e.reason()).await;
                    return None;
                }
            }
        } else {
            match read::open(self.store.clone(), entry.clone()).await {
                Ok(read::HitBody::Whole(bytes)) => full(bytes),
                Ok(read::HitBody::Stream(body)) => body,
                Err(e) => {
                    self.store.evict(&entry, e.reason()).await;
                    return None;
                }
            }
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = entry.status;
        *resp.headers_mut() = hit_headers(&entry);
        Some(resp)
    }

    fn fill_job<B>(&self, req: &Request<B>, target: &CacheTarget, peer: SocketAddr) -> FillJob {
        let mut headers = req.headers().clone();
        for h in NOT_FORWARDED_ON_FILL {
            headers.remove(h);
        }
        forward_request_headers(&mut headers, peer);
        let mut request = Request::new(empty());
        *request.method_mut() = Method::GET;
        // The path was built by the rules from a validated id; it always forms a valid URI.
        *request.uri_mut() = self
            .origin
            .uri(&target.upstream_path)
            .expect("rebuilt upstream path is a valid URI");
        *request.headers_mut() = headers;
        FillJob {
            key: target.key.clone(),
            lote_id: target.lote_id.clone(),
            request,
        }
    }
}

/// The stored head, plus exact `Content-Length`, `Age`, `Via` and `Cache-Status`.
fn hit_headers(entry: &Entry) -> HeaderMap {
    let mut h = entry.headers.clone();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.size));
    let age_s = (store::now_ms().saturating_sub(entry.stored_at_ms) / 1000) as u64;
    h.insert(header::AGE, HeaderValue::from(age_s));
    h.append(header::VIA, HeaderValue::from_static(crate::origin::VIA));
    h.insert(status::CACHE_STATUS, status::hit());
    h
}
