//! What the cache did with a request, as typed values (in the spirit of pingora's `CachePhase`
//! and `NoCacheReason`). A cache-route response carries its [`CacheStatus`] twice: rendered as
//! the `Cache-Status` header (RFC 9211; cache name `lotecache`) for the client, and as a response
//! extension that metrics and the access log read — the header text is never parsed back.
//! Depends on nothing in the crate.

use http::{HeaderName, HeaderValue, Response};
use std::borrow::Cow;
use std::fmt;

pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Why a fetched answer was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStored {
    /// The origin answered another status than `200`.
    OriginStatus(u16),
    /// The answer sets a cookie (and the rule does not ignore it).
    SetCookie,
    /// `Cache-Control: no-store` from the origin.
    OriginNoStore,
    /// `Cache-Control: private` from the origin.
    OriginPrivate,
    /// `Vary: *`, `Cookie` or `Authorization`.
    Vary,
    /// An encoded body (fills ask for identity).
    ContentEncoding,
    /// A `Content-Length` that is not a number.
    BadLength,
    /// A close-delimited body: a cut one could not be told from a complete one.
    NoLength,
    /// Larger than the route's `max_object_size` or `cache.max_size`.
    TooLarge,
    /// The cache's file system is below `cache.min_free`.
    DiskFull,
    /// A purge of this batch ran while it was fetched.
    Purged,
    /// The store could not write or commit it.
    StoreError,
    /// The document failed the rule's validation: the failed check's token.
    Invalid(String),
    /// The request failed before anything could be stored: the error's token.
    Failed(Cow<'static, str>),
}

impl NotStored {
    /// The reason as a `detail=` token and a metric label.
    pub fn token(&self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            NotStored::OriginStatus(code) => return Cow::Owned(format!("origin-status-{code}")),
            NotStored::SetCookie => "set-cookie",
            NotStored::OriginNoStore => "origin-no-store",
            NotStored::OriginPrivate => "origin-private",
            NotStored::Vary => "vary",
            NotStored::ContentEncoding => "content-encoding",
            NotStored::BadLength => "bad-length",
            NotStored::NoLength => "no-length",
            NotStored::TooLarge => "too-large",
            NotStored::DiskFull => "disk-full",
            NotStored::Purged => "purged",
            NotStored::StoreError => "store-error",
            NotStored::Invalid(token) => return Cow::Owned(token.clone()),
            NotStored::Failed(token) => return token.clone(),
        })
    }
}

/// What the cache did with one request of a cache route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the local store: `lotecache; hit`.
    Hit,
    /// A local miss found in the shared store, verified and copied into the local one:
    /// `lotecache; hit; detail=shared`.
    SharedHit,
    /// An expired entry served because the refetch failed with `origin_status`:
    /// `lotecache; hit; fwd=stale; fwd-status=<code>; detail=stale-if-error`.
    Stale { origin_status: u16 },
    /// The entry is stored but could not be read now: `lotecache; hit; detail=<token>`.
    HitFailed(Cow<'static, str>),
    /// Fetched, and being written to the store: `lotecache; fwd=uri-miss; stored`.
    MissStored,
    /// Fetched; whether it is stored is decided by validation that ends after this head was
    /// sent (documents larger than half the replay buffer): `lotecache; fwd=uri-miss`.
    MissPending,
    /// This request joined a fetch already under way: `lotecache; fwd=uri-miss; collapsed`.
    Collapsed,
    /// Fetched, not stored, for this reason: `lotecache; fwd=uri-miss; detail=<reason>`.
    NotStored(NotStored),
    /// Neither served from nor stored in the cache: `lotecache; fwd=bypass; detail=<reason>`.
    Bypass(&'static str),
    /// Answered by the proxy itself, not forwarded: `lotecache; detail=<token>`.
    Rejected(Cow<'static, str>),
}

impl CacheStatus {
    /// The `Cache-Status` header value.
    pub fn header_value(&self) -> HeaderValue {
        match self {
            CacheStatus::Hit => HeaderValue::from_static("lotecache; hit"),
            CacheStatus::SharedHit => HeaderValue::from_static("lotecache; hit; detail=shared"),
            CacheStatus::MissStored => HeaderValue::from_static("lotecache; fwd=uri-miss; stored"),
            CacheStatus::MissPending => HeaderValue::from_static("lotecache; fwd=uri-miss"),
            CacheStatus::Collapsed => HeaderValue::from_static("lotecache; fwd=uri-miss; collapsed"),
            // Details are our own tokens (ASCII); fall back rather than panic if one ever is not.
            other => {
                HeaderValue::from_str(&other.to_string()).unwrap_or_else(|_| HeaderValue::from_static("lotecache"))
            }
        }
    }

    /// The request outcome it stands for (`lotecache_requests_total`, the access log).
    pub fn outcome(&self) -> Outcome {
        match self {
            CacheStatus::Hit | CacheStatus::SharedHit => Outcome::Hit,
            CacheStatus::Stale { .. } => Outcome::Stale,
            CacheStatus::HitFailed(_) => Outcome::Error,
            CacheStatus::MissStored | CacheStatus::MissPending | CacheStatus::NotStored(_) => Outcome::Miss,
            CacheStatus::Collapsed => Outcome::Collapsed,
            CacheStatus::Bypass(_) => Outcome::Pass,
            CacheStatus::Rejected(_) => Outcome::Rejected,
        }
    }

    /// Sets it on `resp`: the header for the client, the extension for metrics and logs.
    pub fn set_on<B>(self, resp: &mut Response<B>) {
        resp.headers_mut().insert(CACHE_STATUS, self.header_value());
        resp.extensions_mut().insert(self);
    }

    /// The status `resp` carries, if it is a cache-route response.
    pub fn of<B>(resp: &Response<B>) -> Option<&CacheStatus> {
        resp.extensions().get::<CacheStatus>()
    }
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheStatus::Hit => f.write_str("lotecache; hit"),
            CacheStatus::SharedHit => f.write_str("lotecache; hit; detail=shared"),
            CacheStatus::Stale { origin_status } => {
                write!(f, "lotecache; hit; fwd=stale; fwd-status={origin_status}; detail=stale-if-error")
            }
            CacheStatus::HitFailed(token) => write!(f, "lotecache; hit; detail={token}"),
            CacheStatus::MissStored => f.write_str("lotecache; fwd=uri-miss; stored"),
            CacheStatus::MissPending => f.write_str("lotecache; fwd=uri-miss"),
            CacheStatus::Collapsed => f.write_str("lotecache; fwd=uri-miss; collapsed"),
            CacheStatus::NotStored(reason) => write!(f, "lotecache; fwd=uri-miss; detail={}", reason.token()),
            CacheStatus::Bypass(reason) => write!(f, "lotecache; fwd=bypass; detail={reason}"),
            CacheStatus::Rejected(token) => write!(f, "lotecache; detail={token}"),
        }
    }
}

/// A request's outcome, the label of `lotecache_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Collapsed,
    Stale,
    Pass,
    Rejected,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Collapsed,
        Outcome::Stale,
        Outcome::Pass,
        Outcome::Rejected,
        Outcome::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Collapsed => "collapsed",
            Outcome::Stale => "stale",
            Outcome::Pass => "pass",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }

    /// Whether the origin was asked for this request's answer (the access log's `origin_ms`).
    pub fn forwarded(self) -> bool {
        matches!(self, Outcome::Miss | Outcome::Collapsed | Outcome::Stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_renders_the_documented_header_and_counts_as_its_outcome() {
        let cases = [
            (CacheStatus::Hit, "lotecache; hit", Outcome::Hit),
            (CacheStatus::SharedHit, "lotecache; hit; detail=shared", Outcome::Hit),
            (
                CacheStatus::Stale { origin_status: 502 },
                "lotecache; hit; fwd=stale; fwd-status=502; detail=stale-if-error",
                Outcome::Stale,
            ),
            (
                CacheStatus::HitFailed("store-unavailable".into()),
                "lotecache; hit; detail=store-unavailable",
                Outcome::Error,
            ),
            (CacheStatus::MissStored, "lotecache; fwd=uri-miss; stored", Outcome::Miss),
            (CacheStatus::MissPending, "lotecache; fwd=uri-miss", Outcome::Miss),
            (CacheStatus::Collapsed, "lotecache; fwd=uri-miss; collapsed", Outcome::Collapsed),
            (
                CacheStatus::NotStored(NotStored::OriginStatus(404)),
                "lotecache; fwd=uri-miss; detail=origin-status-404",
                Outcome::Miss,
            ),
            (
                CacheStatus::NotStored(NotStored::Invalid("assert-lote-id".into())),
                "lotecache; fwd=uri-miss; detail=assert-lote-id",
                Outcome::Miss,
            ),
            (CacheStatus::Bypass("credentials"), "lotecache; fwd=bypass; detail=credentials", Outcome::Pass),
            (CacheStatus::Rejected("access-denied".into()), "lotecache; detail=access-denied", Outcome::Rejected),
        ];
        for (status, text, outcome) in cases {
            assert_eq!(status.header_value(), text);
            assert_eq!(status.to_string(), text);
            assert_eq!(status.outcome(), outcome, "{text}");
        }
    }

    #[test]
    fn a_status_set_on_a_response_is_read_back_without_parsing_the_header() {
        let mut resp = Response::new(());
        CacheStatus::Collapsed.set_on(&mut resp);
        assert_eq!(resp.headers()[CACHE_STATUS], "lotecache; fwd=uri-miss; collapsed");
        assert_eq!(CacheStatus::of(&resp), Some(&CacheStatus::Collapsed));
    }
}
