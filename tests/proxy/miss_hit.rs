//! The miss → tee → hit path.

use crate::support::{batch, get, origin::*, request, send, start_proxy};
use http::{Method, StatusCode};
use std::time::Duration;

#[tokio::test]
async fn miss_then_hit_serves_identical_bytes_and_headers_with_one_generation() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;

    let miss = get(proxy.local_addr(), &batch("L-1")).await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_eq!(miss.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(miss.bytes(), &document("L-1"));

    let hit = get(proxy.local_addr(), &batch("L-1")).await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), miss.bytes());
    for h in ["content-type", "content-disposition", "content-length"] {
        assert_eq!(hit.headers.get(h), miss.headers.get(h), "header {h}");
    }
    assert_eq!(hit.headers["content-disposition"], "attachment; filename=L-1_resultados.json");
    assert_eq!(origin.generations("L-1"), 1);
}

#[tokio::test]
async fn entries_survive_a_restart_and_the_first_request_after_is_a_hit() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let first = get(proxy.local_addr(), &batch("L-2-300kb")).await;
    proxy.shutdown(Duration::from_secs(1)).await;

    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let after = get(proxy.local_addr(), &batch("L-2-300kb")).await;
    assert_eq!(after.cache_status(), "lotecache; hit");
    assert_eq!(after.bytes(), first.bytes());
    assert_eq!(origin.generations("L-2-300kb"), 1);
}

#[tokio::test]
async fn large_hits_stream_with_exact_content_length() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let miss = get(proxy.local_addr(), &batch("L-3-3mb")).await;
    let hit = get(proxy.local_addr(), &batch("L-3-3mb")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("L-3-3mb"));
    assert_eq!(hit.headers["content-length"], miss.bytes().len().to_string());
    assert_eq!(origin.generations("L-3-3mb"), 1);
}

#[tokio::test]
async fn head_on_a_hit_answers_from_the_stored_head() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let miss = get(proxy.local_addr(), &batch("L-4")).await;
    let head = send(request(Method::HEAD, proxy.local_addr(), &batch("L-4"))).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.cache_status(), "lotecache; hit");
    assert_eq!(head.headers["content-length"], miss.bytes().len().to_string());
    assert_eq!(head.headers["content-type"], "application/json");
    assert!(head.bytes().is_empty());
    assert_eq!(origin.generations("L-4"), 1);
}

#[tokio::test]
async fn head_on_a_miss_fills_the_whole_entry_with_a_get() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let head = send(request(Method::HEAD, proxy.local_addr(), &batch("L-5"))).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.headers["content-length"], document("L-5").len().to_string());
    assert!(head.bytes().is_empty());
    // The fill goes on without a body reader; the entry appears complete.
    crate::support::wait_until(Duration::from_secs(2), || proxy.store().get("L-5_resultados.json").is_some()).await;
    let hit = get(proxy.local_addr(), &batch("L-5")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("L-5"));
    assert_eq!(origin.seen().iter().filter(|s| s.method == "HEAD").count(), 0);
    assert_eq!(origin.generations("L-5"), 1);
}

#[tokio::test]
async fn a_complete_chunked_body_is_stored() {
    let origin = TestOrigin::start().await;
    origin.set("L-6", Behavior::Chunked);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let miss = get(proxy.local_addr(), &batch("L-6")).await;
    assert_eq!(miss.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(miss.bytes(), &document("L-6"));
    let hit = get(proxy.local_addr(), &batch("L-6")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("L-6"));
    assert_eq!(hit.headers["content-length"], document("L-6").len().to_string());
    assert_eq!(origin.generations("L-6"), 1);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_miss_still_leaves_a_complete_entry() {
    let origin = TestOrigin::start().await;
    origin.set("L-7-2mb", Behavior::Ok { delay: Duration::ZERO, pieces: 8, gap: Duration::from_millis(60) });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;

    let resp =
        crate::support::client().request(request(Method::GET, proxy.local_addr(), &batch("L-7-2mb"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp); // the client leaves after the head, with most of the body still to come

    crate::support::wait_until(Duration::from_secs(4), || proxy.store().get("L-7-2mb_resultados.json").is_some()).await;
    let hit = get(proxy.local_addr(), &batch("L-7-2mb")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("L-7-2mb"));
    assert_eq!(origin.generations("L-7-2mb"), 1);
}
