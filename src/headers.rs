//! Header rewriting between clients and the origin: hop-by-hop headers (RFC 9110 §7.6.1) and
//! those a `Connection` header names, headers a client must never set for the origin
//! (`X-Forwarded-*`, method overrides), `Via`, the origin response's framing check, and the names
//! of the headers this proxy adds. Used by the client side and the cache alike; depends on
//! nothing in the crate.

use http::header::Entry;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use std::net::SocketAddr;

/// `Via` value this proxy adds.
pub const VIA: &str = "1.1 lotecache";

/// `Repr-Digest` (RFC 9530): the sha-256 of the representation, on every stored answer.
pub const REPR_DIGEST: HeaderName = HeaderName::from_static("repr-digest");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `Upgrade`.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Request headers that override routing, method or origin identity in some backends
/// (IIS, Symfony, Flask extensions): dropped from every forwarded request.
fn is_client_untrusted(name: &str) -> bool {
    matches!(
        name,
        "x-original-url"
            | "x-rewrite-url"
            | "forwarded"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "x-forwarded-server"
            | "x-forwarded-port"
    )
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Why an origin response's framing is refused (502, connection discarded), if it is:
/// several Content-Length values, Content-Length with Transfer-Encoding, or a
/// Transfer-Encoding other than exactly `chunked`.
pub fn framing_problem(headers: &HeaderMap) -> Option<&'static str> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let length = lengths.next();
    if lengths.next().is_some() || length.is_some_and(|v| v.as_bytes().contains(&b',')) {
        return Some("several Content-Length values");
    }
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    let first = te.next()?;
    if length.is_some() {
        return Some("Content-Length with Transfer-Encoding");
    }
    if te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
        return Some("a Transfer-Encoding other than chunked");
    }
    None
}

/// The origin answered with framing we refuse to pass on.
#[derive(Debug, thiserror::Error)]
#[error("malformed response framing from the origin: {0}")]
pub struct MalformedResponse(pub &'static str);

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    remove_where(headers, |_| false);
}

/// The tokens of the `Connection` header(s), trimmed.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// Removes hop-by-hop headers, those the `Connection` header names, and those `also` picks:
/// one pass over the names present for the first two kinds (no lookup per name that could be
/// there), one lookup per `Connection` token (usually one: `close` or `keep-alive`) for the
/// last, and no allocation unless there are several `Connection` headers.
fn remove_where(headers: &mut HeaderMap, also: impl Fn(&str) -> bool) {
    // The `Connection` values are kept aside (a reference count each): the header itself is
    // among those removed.
    let mut values = headers.get_all(header::CONNECTION).iter();
    let first = values.next().cloned();
    let more: Vec<HeaderValue> = values.cloned().collect();
    // Found and removed one at a time: a header map cannot drop entries while iterated.
    while let Some(name) = headers.keys().find(|n| is_hop_by_hop(n.as_str()) || also(n.as_str())).cloned() {
        headers.remove(name);
    }
    let tokens = first.iter().chain(&more).filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    for token in tokens.map(str::trim).filter(|t| !t.is_empty()) {
        // Looked up as text: a token that is no header name (`close`) finds nothing.
        headers.remove(token);
    }
}

/// Rewrites a client request's headers for the origin: hop-by-hop removed, `X-Forwarded-For`
/// appended with the peer, `X-Forwarded-Proto`/`-Host` overwritten (never trusted from clients),
/// `Via` appended.
pub fn forward_request_headers(headers: &mut HeaderMap, peer: SocketAddr) {
    // Headers some frameworks trust for routing or identity: never from a client.
    remove_where(headers, is_client_untrusted);
    // Room for the four added below at once, rather than a regrowth on the way.
    headers.reserve(4);
    let peer_ip = ip_text(peer.ip());
    // One lookup per added header (an entry), not a `get` and then an `insert`.
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Occupied(mut prev) => {
            let joined = match prev.get().to_str() {
                Ok(p) if !p.trim().is_empty() => [p.as_bytes(), b", ", &peer_ip].concat(),
                _ => peer_ip,
            };
            match HeaderValue::from_bytes(&joined) {
                Ok(v) => drop(prev.insert(v)),
                Err(_) => drop(prev.remove()),
            }
        }
        Entry::Vacant(slot) => {
            if let Ok(v) = HeaderValue::from_bytes(&peer_ip) {
                slot.insert(v);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match headers.get(header::HOST).cloned() {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
    append_via(headers);
}

/// Rewrites an origin response's headers for the client.
pub fn forward_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    append_via(headers);
}

fn append_via(headers: &mut HeaderMap) {
    match headers.entry(header::VIA) {
        Entry::Occupied(mut prev) => {
            if let Ok(v) = HeaderValue::from_bytes(&[prev.get().as_bytes(), b", ", VIA.as_bytes()].concat()) {
                prev.insert(v);
            }
        }
        Entry::Vacant(slot) => {
            slot.insert(HeaderValue::from_static(VIA));
        }
    }
}

/// An address as text, IPv4 without the formatting machinery (this runs on every forwarded
/// request; `Display` for an IPv4 address costs more than the rest of the header rewrite).
fn ip_text(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut out = Vec::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
            out
        }
        ip => ip.to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn connection_tokens_name_headers_in_any_case_across_several_connection_headers() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.append(header::CONNECTION, HeaderValue::from_static(" , x-other ,not a name"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("2"));
        h.insert("x-kept", HeaderValue::from_static("3"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn origin_framing_is_checked() {
        let h = |pairs: &[(&str, &str)]| -> HeaderMap {
            pairs.iter().map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap())).collect()
        };
        assert_eq!(framing_problem(&h(&[("content-length", "5")])), None);
        assert_eq!(framing_problem(&h(&[("transfer-encoding", "chunked")])), None);
        assert!(framing_problem(&h(&[("content-length", "5, 7")])).is_some());
        assert!(framing_problem(&h(&[("transfer-encoding", "gzip, chunked")])).is_some());
        assert!(framing_problem(&h(&[("transfer-encoding", "chunked"), ("content-length", "5")])).is_some());
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.30.40", "255.255.255.255", "1.100.9.99", "::1", "2001:db8::7"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string().into_bytes());
        }
    }

    #[test]
    fn via_is_appended_to_the_origins_own() {
        let mut h = HeaderMap::new();
        forward_response_headers(&mut h);
        assert_eq!(h[header::VIA], VIA);
        h.insert(header::VIA, HeaderValue::from_static("1.0 fred"));
        forward_response_headers(&mut h);
        assert_eq!(h[header::VIA], "1.0 fred, 1.1 lotecache");
    }

    #[test]
    fn forwarded_headers_append_the_peer_and_overwrite_client_claims() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        forward_request_headers(&mut h, "127.0.0.9:1234".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h[header::VIA], VIA);
    }
}
