//! Typed errors of the request path, and the one place where they become HTTP responses.

use crate::body::{full, BoxError, ProxyBody};
use crate::cache::status::CacheStatus;
use http::{header, HeaderValue, Response, StatusCode};

/// Why a request could not be answered by the origin or the store.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The batch id in the path does not match the rule's id pattern.
    #[error("invalid lote_id")]
    InvalidId { detail: String },
    /// The request is malformed for a cache route (query string, body on GET, …).
    #[error("bad request")]
    BadRequest { detail: String },
    /// The origin could not be connected to (refused, unresolvable, connect timeout).
    #[error("origin unreachable")]
    OriginUnreachable(#[source] BoxError),
    /// The origin accepted the request but did not send a response head in time.
    #[error("origin timed out")]
    OriginTimeout { phase: &'static str },
    /// The origin connection failed after the request was sent.
    #[error("origin error")]
    OriginFailed(#[source] BoxError),
    /// The fill this request was waiting on ended without a response (aborted task).
    #[error("fill aborted")]
    FillAborted,
    /// The origin's document failed the route's validation in a way that forbids serving it
    /// (not JSON, or another batch's data).
    #[error("origin sent an invalid document")]
    InvalidDocument { token: String, reason: String },
    /// The route's access check could not be run or answered something else than 2xx/401/403.
    #[error("access check failed")]
    AccessCheckFailed { detail: String },
    /// The client's request body broke its own framing (bad chunk size, cut short).
    #[error("malformed request body")]
    MalformedBody { detail: String },
    /// This request waited longer than `cache.wait_timeout` for a fill.
    #[error("timed out waiting for the origin fetch")]
    WaitTimeout,
    /// The request head was refused before routing (by hyper's parser or the strict framing
    /// check): answered on the connection by [`crate::server::client_io`], which then closes it.
    #[error("malformed request head")]
    MalformedHead { status: StatusCode, detail: String },
    /// Too many fills run (or wait) already: answered `503` with `Retry-After`.
    #[error("too many origin fetches in progress")]
    Busy { detail: String },
    /// The store could not be read for a reason that proves nothing about the entry (file
    /// table full, I/O error, a hit past its deadline): `503`, the entry kept.
    #[error("cache store temporarily unreadable")]
    StoreUnavailable { detail: String },
    /// A body of unknown length for a client that could not tell a cut one from a complete
    /// one (HTTP/1.0), and too large to buffer.
    #[error("cannot frame the response for this client")]
    Unframed { detail: String },
    /// `Cache-Control: only-if-cached` and nothing stored (RFC 9111 §5.2.1.7): `504`.
    #[error("not in the cache")]
    NotCached,
    /// `If-Match` names no tag of the stored representation (RFC 9110 §13.1.1): `412`.
    #[error("precondition failed")]
    PreconditionFailed,
    /// The `Range` starts past the end of the `len`-byte representation: `416`, with
    /// `Content-Range: bytes */len`.
    #[error("range not satisfiable")]
    RangeNotSatisfiable { len: u64 },
}

impl ProxyError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidId { .. } | ProxyError::BadRequest { .. } | ProxyError::MalformedBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::AccessCheckFailed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::OriginUnreachable(_)
            | ProxyError::OriginFailed(_)
            | ProxyError::FillAborted
            | ProxyError::InvalidDocument { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::OriginTimeout { .. } | ProxyError::WaitTimeout | ProxyError::NotCached => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::MalformedHead { status, .. } => *status,
            ProxyError::Busy { .. } | ProxyError::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unframed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ProxyError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        }
    }

    /// A short token naming the failure, used in `Cache-Status: …; detail=` and in metrics.
    pub fn token(&self) -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed(match self {
            ProxyError::InvalidDocument { token, .. } => return std::borrow::Cow::Owned(token.clone()),
            ProxyError::InvalidId { .. } => "invalid-lote-id",
            ProxyError::BadRequest { .. } => "bad-request",
            ProxyError::OriginUnreachable(_) => "origin-unreachable",
            ProxyError::OriginTimeout { .. } => "origin-timeout",
            ProxyError::OriginFailed(_) => "origin-error",
            ProxyError::FillAborted => "fill-aborted",
            ProxyError::WaitTimeout => "wait-timeout",
            ProxyError::AccessCheckFailed { .. } => "access-check-failed",
            ProxyError::MalformedBody { .. } => "malformed-body",
            ProxyError::MalformedHead { .. } => "malformed-head",
            ProxyError::Busy { .. } => "busy",
            ProxyError::StoreUnavailable { .. } => "store-unavailable",
            ProxyError::Unframed { .. } => "unframed-for-http10",
            ProxyError::NotCached => "not-cached",
            ProxyError::PreconditionFailed => "precondition-failed",
            ProxyError::RangeNotSatisfiable { .. } => "range-not-satisfiable",
        })
    }

    /// Human-readable detail for the JSON body. Never contains raw request bytes unescaped:
    /// it is serialized by serde_json, which escapes control characters.
    pub fn detail(&self) -> String {
        match self {
            ProxyError::InvalidId { detail } | ProxyError::BadRequest { detail } => detail.clone(),
            ProxyError::InvalidDocument { reason, .. } => reason.clone(),
            ProxyError::AccessCheckFailed { detail }
            | ProxyError::MalformedBody { detail }
            | ProxyError::MalformedHead { detail, .. }
            | ProxyError::Busy { detail }
            | ProxyError::StoreUnavailable { detail }
            | ProxyError::Unframed { detail } => detail.clone(),
            ProxyError::OriginUnreachable(e) | ProxyError::OriginFailed(e) => error_chain(e.as_ref()),
            ProxyError::OriginTimeout { phase } => {
                format!("no {phase} from the origin within the configured timeout")
            }
            ProxyError::FillAborted => "the origin fetch for this entry was abandoned".to_string(),
            ProxyError::NotCached => "the request said only-if-cached and no fresh entry is stored".to_string(),
            ProxyError::PreconditionFailed => "If-Match names no tag of the stored representation".to_string(),
            ProxyError::RangeNotSatisfiable { len } => {
                format!("the range starts past the end of the {len}-byte document")
            }
            ProxyError::WaitTimeout => {
                "the fetch this request joined did not answer within cache.wait_timeout".to_string()
            }
        }
    }

    /// Turns the error into its response: status, `{"error","detail"}` JSON body, and a log line.
    /// `cache_status` is set on responses of cache routes.
    pub fn to_response(&self, cache_status: Option<CacheStatus>) -> Response<ProxyBody> {
        let mut resp = Response::new(full(self.logged_json_body()));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(cs) = cache_status {
            cs.set_on(&mut resp);
        }
        if let ProxyError::RangeNotSatisfiable { len } = self {
            resp.headers_mut().insert(header::CONTENT_RANGE, crate::cache::range::content_range(None, *len));
        }
        if matches!(self, ProxyError::Busy { .. } | ProxyError::StoreUnavailable { .. }) {
            // Both pass quickly: a fill slot frees, a file table drains.
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }

    /// Writes the error's log line and returns its `{"error","detail"}` JSON body.
    pub fn logged_json_body(&self) -> String {
        let status = self.status();
        let detail = self.detail();
        // Details can hold client input: escaped for the log line, JSON-escaped in the body.
        let logged = detail.escape_debug().to_string();
        if status.is_server_error() {
            tracing::warn!(error = %self, detail = %logged, status = status.as_u16(), "request failed");
        } else {
            tracing::info!(error = %self, detail = %logged, status = status.as_u16(), "request rejected");
        }
        serde_json::json!({ "error": self.to_string(), "detail": detail }).to_string()
    }
}

/// `outer: inner: innermost`, so a log line says why without a debug dump.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}
