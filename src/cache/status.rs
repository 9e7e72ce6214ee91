//! `Cache-Status` values (RFC 9211) for responses of cache routes; cache name `lotecache`.

use http::{HeaderName, HeaderValue};

pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// `lotecache; hit`
pub fn hit() -> HeaderValue {
    HeaderValue::from_static("lotecache; hit")
}

/// `lotecache; hit; detail=shared` — a local miss found in the shared store, verified and
/// copied into the local one.
pub fn shared_hit() -> HeaderValue {
    HeaderValue::from_static("lotecache; hit; detail=shared")
}

/// `lotecache; fwd=uri-miss; stored` — the miss is being written to the store.
pub fn miss_stored() -> HeaderValue {
    HeaderValue::from_static("lotecache; fwd=uri-miss; stored")
}

/// `lotecache; fwd=uri-miss` — fetched; whether it is stored depends on validation that
/// ends after this head was sent (documents larger than half the replay buffer).
pub fn miss_pending() -> HeaderValue {
    HeaderValue::from_static("lotecache; fwd=uri-miss")
}

/// `lotecache; fwd=uri-miss; collapsed` — this request joined a fill already under way.
pub fn collapsed() -> HeaderValue {
    HeaderValue::from_static("lotecache; fwd=uri-miss; collapsed")
}

/// `lotecache; fwd=uri-miss; detail=<token>` — forwarded, not stored, for this reason.
pub fn miss_not_stored(detail: &str) -> HeaderValue {
    value(&format!("lotecache; fwd=uri-miss; detail={detail}"))
}

/// `lotecache; hit; detail=<token>` — the entry is stored but could not be read now.
pub fn hit_failed(detail: &str) -> HeaderValue {
    value(&format!("lotecache; hit; detail={detail}"))
}

/// `lotecache; detail=<token>` — answered by the proxy itself, not forwarded.
pub fn rejected(detail: &str) -> HeaderValue {
    value(&format!("lotecache; detail={detail}"))
}

fn value(s: &str) -> HeaderValue {
    // Details are our own tokens (ASCII); fall back rather than panic if one ever is not.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("lotecache"))
}

/// `lotecache; hit; fwd=stale; fwd-status=<code>; detail=stale-if-error` — an expired entry
/// served because the refetch failed.
pub fn stale(origin_status: u16) -> HeaderValue {
    value(&format!("lotecache; hit; fwd=stale; fwd-status={origin_status}; detail=stale-if-error"))
}

/// `lotecache; fwd=bypass; detail=<reason>` — not served from or stored in the cache.
pub fn bypass(detail: &str) -> HeaderValue {
    value(&format!("lotecache; fwd=bypass; detail={detail}"))
}
