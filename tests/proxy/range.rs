//! Byte ranges of stored batches (RFC 9110 §14): one range is a `206` cut from the verified
//! entry (from memory, or with `sendfile` at an offset for a large one), several or a malformed
//! one the whole `200`, one past the end a `416`; `If-Range` and `If-Match` compare the stored
//! representation's strong `ETag`. A `Range` on a miss gets the whole document and stores it.

use crate::support::origin::*;
use crate::support::{batch, get, request, send, setup, Got};
use bytes::Bytes;
use http::{Method, StatusCode};
use std::net::SocketAddr;

/// GET `id` with these extra request headers.
async fn get_with(proxy: SocketAddr, id: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = request(Method::GET, proxy, &batch(id));
    for (name, value) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    }
    send(req).await
}

/// Stores batch `id` (a miss) and returns a hit of it: the head a stored entry is served with.
async fn stored(proxy: SocketAddr, id: &str) -> Got {
    get(proxy, &batch(id)).await;
    let hit = get(proxy, &batch(id)).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    hit
}

/// Asserts a `206` carrying exactly bytes `start..=end` of `doc`, as a hit.
fn assert_part(got: &Got, doc: &Bytes, start: usize, end: usize) {
    assert_eq!(got.status, StatusCode::PARTIAL_CONTENT, "{:?}", got.headers);
    assert_eq!(got.headers["content-range"], format!("bytes {start}-{end}/{}", doc.len()));
    assert_eq!(got.headers["content-length"], (end - start + 1).to_string());
    assert_eq!(got.headers["accept-ranges"], "bytes");
    assert_eq!(got.cache_status(), "lotecache; hit");
    assert!(got.bytes()[..] == doc[start..=end], "the 206 carried other bytes than {start}..={end}");
}

#[tokio::test]
async fn one_range_of_a_stored_batch_is_a_206_of_exactly_those_bytes() {
    let (origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-1-256kb");
    let whole = stored(addr, "R-1-256kb").await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.headers["accept-ranges"], "bytes", "the whole answer of a hit says ranges are served");
    let n = doc.len();
    for (range, start, end) in [
        ("bytes=0-99".to_string(), 0, 99),
        ("bytes=1000-1999".to_string(), 1000, 1999),
        (format!("bytes={}-", n - 100), n - 100, n - 1),
        ("bytes=-100".to_string(), n - 100, n - 1),
        (format!("bytes={}-{}", n - 10, n + 50), n - 10, n - 1),
        (format!("bytes={}-{}", n - 1, n - 1), n - 1, n - 1),
    ] {
        let got = get_with(addr, "R-1-256kb", &[("range", &range)]).await;
        assert_part(&got, &doc, start, end);
        assert_eq!(got.headers["etag"], whole.headers["etag"], "a part carries the representation's ETag");
        assert_eq!(got.headers["repr-digest"], whole.headers["repr-digest"]);
    }
    assert_eq!(origin.generations("R-1-256kb"), 1);
}

#[tokio::test]
async fn a_range_of_a_large_batch_sent_from_its_file_is_exactly_those_bytes() {
    // 2 MB: past cache.memory_object_max, so served from the mapped file with sendfile.
    let (origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-2-2mb");
    assert_eq!(get(addr, &batch("R-2-2mb")).await.bytes(), &doc);
    for (start, end) in [(0, 65_535), (1_000_001, 1_700_000), (doc.len() - 300_000, doc.len() - 1)] {
        let got = get_with(addr, "R-2-2mb", &[("range", &format!("bytes={start}-{end}"))]).await;
        assert_part(&got, &doc, start, end);
    }
    assert_eq!(origin.generations("R-2-2mb"), 1);
}

#[tokio::test]
async fn a_range_past_the_end_is_416_with_the_length_and_nothing_else_is_sent() {
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-3");
    get(addr, &batch("R-3")).await;
    for range in
        [format!("bytes={}-", doc.len()), format!("bytes={}-{}", doc.len() + 5, doc.len() + 9), "bytes=-0".into()]
    {
        let got = get_with(addr, "R-3", &[("range", &range)]).await;
        assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(got.headers["content-range"], format!("bytes */{}", doc.len()));
        assert_eq!(got.json()["error"], "range not satisfiable");
        assert_eq!(got.cache_status(), "lotecache; hit");
    }
}

#[tokio::test]
async fn several_ranges_a_malformed_one_or_another_unit_get_the_whole_document() {
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-4");
    get(addr, &batch("R-4")).await;
    for range in ["bytes=0-1,5-6", "bytes=9-5", "bytes=abc", "items=0-5", "bytes=-"] {
        let got = get_with(addr, "R-4", &[("range", range)]).await;
        assert_eq!(got.status, StatusCode::OK, "{range}");
        assert!(got.headers.get("content-range").is_none());
        assert_eq!(got.bytes(), &doc, "{range}");
    }
}

#[tokio::test]
async fn if_range_with_the_current_strong_etag_gets_the_part_and_anything_else_the_whole() {
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-5");
    let etag = stored(addr, "R-5").await.headers["etag"].to_str().unwrap().to_string();
    let matching = get_with(addr, "R-5", &[("range", "bytes=10-19"), ("if-range", &etag)]).await;
    assert_part(&matching, &doc, 10, 19);
    for other in ["\"sha256-00\"".to_string(), format!("W/{etag}"), "Thu, 03 Dec 2026 09:30:00 GMT".into()] {
        let got = get_with(addr, "R-5", &[("range", "bytes=10-19"), ("if-range", &other)]).await;
        assert_eq!(got.status, StatusCode::OK, "If-Range: {other}");
        assert_eq!(got.bytes(), &doc);
    }
}

#[tokio::test]
async fn if_match_that_names_another_representation_is_412_and_the_current_one_is_served() {
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-6");
    let etag = stored(addr, "R-6").await.headers["etag"].to_str().unwrap().to_string();
    let refused = get_with(addr, "R-6", &[("if-match", "\"sha256-00\""), ("range", "bytes=0-9")]).await;
    assert_eq!(refused.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(refused.json()["error"], "precondition failed");
    assert_eq!(refused.headers["etag"], etag.as_str());
    for if_match in [etag.as_str(), "*"] {
        let got = get_with(addr, "R-6", &[("if-match", if_match), ("range", "bytes=0-9")]).await;
        assert_part(&got, &doc, 0, 9);
    }
}

#[tokio::test]
async fn conditions_that_send_no_body_come_before_the_range() {
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let etag = stored(addr, "R-7").await.headers["etag"].to_str().unwrap().to_string();
    let not_modified = get_with(addr, "R-7", &[("if-none-match", &etag), ("range", "bytes=0-9")]).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    let mut head = request(Method::HEAD, addr, &batch("R-7"));
    head.headers_mut().insert("range", "bytes=0-9".parse().unwrap());
    let head = send(head).await;
    assert_eq!(head.status, StatusCode::OK, "HEAD ignores Range");
    assert_eq!(head.headers["content-length"], document("R-7").len().to_string());
    assert!(head.bytes().is_empty());
}

#[tokio::test]
async fn if_match_is_weighed_before_if_none_match_and_list_headers_may_span_lines() {
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-10");
    let etag = stored(addr, "R-10").await.headers["etag"].to_str().unwrap().to_string();
    // RFC 9110 §13.2.2: a failed If-Match is 412 even when If-None-Match would give 304.
    let got = get_with(addr, "R-10", &[("if-match", "\"sha256-00\""), ("if-none-match", &etag)]).await;
    assert_eq!(got.status, StatusCode::PRECONDITION_FAILED);
    // If-Match over two lines, the second naming this representation: served.
    let mut req = request(Method::GET, addr, &batch("R-10"));
    req.headers_mut().append("if-match", "\"sha256-00\"".parse().unwrap());
    req.headers_mut().append("if-match", etag.parse().unwrap());
    req.headers_mut().insert("range", "bytes=0-9".parse().unwrap());
    assert_part(&send(req).await, &doc, 0, 9);
    // Two Range lines are not one range: the whole document.
    let mut req = request(Method::GET, addr, &batch("R-10"));
    req.headers_mut().append("range", "bytes=0-9".parse().unwrap());
    req.headers_mut().append("range", "bytes=20-29".parse().unwrap());
    let got = send(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &doc);
}

#[tokio::test]
async fn a_range_on_a_miss_gets_the_whole_document_which_is_stored_for_the_next_range() {
    let (origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-8");
    let miss = get_with(addr, "R-8", &[("range", "bytes=0-9")]).await;
    assert_eq!(miss.status, StatusCode::OK, "a fill fetches and answers the whole document");
    assert_eq!(miss.bytes(), &doc);
    assert!(miss.cache_status().starts_with("lotecache; fwd=uri-miss"));
    let asked: Vec<_> = origin.seen().into_iter().filter(|s| s.target.ends_with("/R-8")).collect();
    assert_eq!(asked.len(), 1);
    assert!(!asked[0].headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("range")), "the fill never asks for a part");
    let hit = get_with(addr, "R-8", &[("range", "bytes=0-9")]).await;
    assert_part(&hit, &doc, 0, 9);
    assert_eq!(origin.generations("R-8"), 1);
}

#[tokio::test]
async fn a_range_never_vouches_for_a_corrupt_entry() {
    let (origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-9-2mb");
    get(addr, &batch("R-9-2mb")).await;
    // A flipped byte outside the range asked for: the whole file is verified before any part.
    let path = proxy.store().get("R-9-2mb_resultados.json").unwrap().path.clone();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[doc.len() - 5] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let got = get_with(addr, "R-9-2mb", &[("range", "bytes=0-99")]).await;
    assert_eq!(got.status, StatusCode::OK, "refetched whole, never a part of a corrupt entry");
    assert_eq!(got.bytes(), &doc);
    assert_eq!(origin.generations("R-9-2mb"), 2);

    // Nor with a 416: an unsatisfiable range hashes the entry it answers for (a flipped byte,
    // the file's size unchanged).
    let path = proxy.store().get("R-9-2mb_resultados.json").unwrap().path.clone();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[7] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let got = get_with(addr, "R-9-2mb", &[("range", &format!("bytes={}-", doc.len()))]).await;
    assert_eq!(got.status, StatusCode::OK, "a 416 must not vouch for a corrupt entry");
    assert_eq!(origin.generations("R-9-2mb"), 3);
}

#[tokio::test]
async fn an_http10_client_gets_its_range_framed_by_content_length() {
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("R-11-2mb");
    stored(addr, "R-11-2mb").await;
    let reply =
        crate::support::raw::http10_get(addr, &batch("R-11-2mb"), &[("range", "bytes=500000-899999")]).await.unwrap();
    assert_eq!(reply.status, Some(206));
    assert_eq!(reply.headers["content-length"], "400000");
    assert_eq!(reply.headers["content-range"], format!("bytes 500000-899999/{}", doc.len()));
    assert!(reply.body[..] == doc[500_000..900_000]);
}

#[tokio::test]
async fn an_expired_entry_served_for_a_failed_refetch_answers_the_range_too() {
    let rule = "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{lote_id}\"\nttl = \"1s\"\n";
    let (origin, _dir, proxy) = setup(rule).await;
    let addr = proxy.local_addr();
    let doc = document("R-12");
    get(addr, &batch("R-12")).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    origin.set("R-12", Behavior::Status(500));
    let got = get_with(addr, "R-12", &[("range", "bytes=100-199")]).await;
    assert_eq!(got.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(got.cache_status(), "lotecache; hit; fwd=stale; fwd-status=500; detail=stale-if-error");
    assert!(got.bytes()[..] == doc[100..200]);
}
