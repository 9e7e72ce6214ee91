//! What may be stored: the decision taken on the origin's response head, before any byte is
//! written. A refusal names its reason, which becomes `Cache-Status: …; detail=<reason>`.

use super::status::NotStored;
use http::{header, HeaderMap, HeaderName, StatusCode};

/// Response headers a rule stores despite (the default refuses to store them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IgnoreResponse {
    /// Store despite `Set-Cookie` (the cookie itself is never stored).
    pub set_cookie: bool,
    /// Store despite `Cache-Control: private` / `no-store`.
    pub cache_control: bool,
    /// Store despite `Vary: *`, `Cookie` or `Authorization`.
    pub vary: bool,
}

/// Response headers addressed to the one request the origin answered: a session cookie set
/// or refreshed, an authentication exchange, an order to clear the client's own data. A fill
/// hands them only to the request that started it; a request that joins the fill, a hit and
/// a shared-store copy never carry them, and they are never stored.
pub const PER_REQUEST_RESPONSE_HEADERS: [HeaderName; 5] = [
    header::SET_COOKIE,
    HeaderName::from_static("set-cookie2"),
    HeaderName::from_static("authentication-info"),
    HeaderName::from_static("proxy-authentication-info"),
    HeaderName::from_static("clear-site-data"),
];

/// Removes the per-request headers from `headers` and returns them.
pub fn take_per_request(headers: &mut HeaderMap) -> HeaderMap {
    let mut taken = HeaderMap::new();
    for name in PER_REQUEST_RESPONSE_HEADERS {
        if let header::Entry::Occupied(e) = headers.entry(name) {
            let (name, values) = e.remove_entry_mult();
            for v in values {
                taken.append(name.clone(), v);
            }
        }
    }
    taken
}

/// The outcome of looking at an origin response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storability {
    /// Store it once the body is complete; `Some(n)` is the exact length it must have,
    /// `None` a chunked body whose end is signalled by the framing.
    Store { expected_len: Option<u64> },
    /// Serve it, do not store it.
    DontStore(NotStored),
}

/// Decides from the status and the raw headers (before hop-by-hop removal: framing matters).
/// `json_checked`: the body will be parsed as JSON before storing, which tells a complete
/// close-delimited body from a cut one.
pub fn storability(status: StatusCode, headers: &HeaderMap, json_checked: bool, ignore: IgnoreResponse) -> Storability {
    use Storability::DontStore;
    if status != StatusCode::OK {
        return DontStore(NotStored::OriginStatus(status.as_u16()));
    }
    if headers.contains_key(header::SET_COOKIE) && !ignore.set_cookie {
        return DontStore(NotStored::SetCookie);
    }
    let cc = header_tokens(headers, header::CACHE_CONTROL);
    if !ignore.cache_control {
        if cc.iter().any(|d| d == "no-store") {
            return DontStore(NotStored::OriginNoStore);
        }
        if cc.iter().any(|d| d == "private" || d.starts_with("private=")) {
            return DontStore(NotStored::OriginPrivate);
        }
    }
    let vary = header_tokens(headers, header::VARY);
    if !ignore.vary && vary.iter().any(|v| v == "*" || v == "cookie" || v == "authorization") {
        return DontStore(NotStored::Vary);
    }
    if headers.contains_key(header::CONTENT_ENCODING) {
        // Fills ask for identity; an encoded answer would be served to clients that can't read it.
        return DontStore(NotStored::ContentEncoding);
    }
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        return match len.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) => Storability::Store { expected_len: Some(n) },
            None => DontStore(NotStored::BadLength),
        };
    }
    let chunked = header_tokens(headers, header::TRANSFER_ENCODING).last().is_some_and(|t| t == "chunked");
    if chunked || json_checked {
        Storability::Store { expected_len: None }
    } else {
        // Close-delimited: a cut body cannot be told from a complete one by framing.
        DontStore(NotStored::NoLength)
    }
}

/// Lower-cased, trimmed comma-separated tokens of every `name` header (parameters kept).
fn header_tokens(headers: &HeaderMap, name: header::HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap())).collect()
    }

    #[test]
    fn only_complete_framed_200s_are_stored() {
        assert_eq!(
            storability(StatusCode::OK, &h(&[("content-length", "10")]), false, IgnoreResponse::default()),
            Storability::Store { expected_len: Some(10) }
        );
        assert_eq!(
            storability(StatusCode::OK, &h(&[("transfer-encoding", "chunked")]), false, IgnoreResponse::default()),
            Storability::Store { expected_len: None }
        );
        assert_eq!(
            storability(StatusCode::OK, &h(&[]), false, IgnoreResponse::default()),
            Storability::DontStore(NotStored::NoLength)
        );
        assert_eq!(
            storability(StatusCode::OK, &h(&[]), true, IgnoreResponse::default()),
            Storability::Store { expected_len: None }
        );
        assert_eq!(
            storability(
                StatusCode::INTERNAL_SERVER_ERROR,
                &h(&[("content-length", "1")]),
                false,
                IgnoreResponse::default()
            ),
            Storability::DontStore(NotStored::OriginStatus(500))
        );
    }

    #[test]
    fn per_user_responses_are_not_stored() {
        for (k, v, why) in [
            ("set-cookie", "a=b", NotStored::SetCookie),
            ("cache-control", "max-age=0, no-store", NotStored::OriginNoStore),
            ("cache-control", "private", NotStored::OriginPrivate),
            ("vary", "Accept, Cookie", NotStored::Vary),
            ("content-encoding", "gzip", NotStored::ContentEncoding),
        ] {
            let headers = h(&[("content-length", "1"), (k, v)]);
            assert_eq!(
                storability(StatusCode::OK, &headers, true, IgnoreResponse::default()),
                Storability::DontStore(why)
            );
        }
    }

    #[test]
    fn a_route_may_store_despite_named_headers() {
        let all = IgnoreResponse { set_cookie: true, cache_control: true, vary: true };
        let headers =
            h(&[("content-length", "1"), ("set-cookie", "a=b"), ("cache-control", "private"), ("vary", "Cookie")]);
        assert_eq!(storability(StatusCode::OK, &headers, false, all), Storability::Store { expected_len: Some(1) });
    }
}
