//! Route rules: ids, queries, bodies on cache routes.

use crate::support::{batch, get, origin::*, start_proxy};
use http::StatusCode;

#[tokio::test]
async fn an_invalid_lote_id_gets_400_and_the_origin_sees_nothing() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let long = "a".repeat(129);
    for id in ["..", "%2e%2e", "A%2F..%2FB", "A;jsessionid=1", "A%00", "A%0d%0aX-Injected:%201", long.as_str()] {
        let got = get(proxy.local_addr(), &batch(id)).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{id}");
        assert_eq!(got.json()["error"], "invalid lote_id", "{id}");
        assert_eq!(got.cache_status(), "lotecache; detail=invalid-lote-id");
    }
    assert!(origin.seen().is_empty(), "the origin saw {:?}", origin.seen());
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn a_query_string_on_the_batch_route_is_rejected_by_default() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let got = get(proxy.local_addr(), "/download_batch_results/Q-1?download=1").await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.json()["detail"], "query strings are not accepted on this route");
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn a_keyed_query_string_makes_its_own_entry_and_reaches_the_origin() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rule = "[[rules]]\nname = \"batch\"\npath = \"/download_batch_results/{lote_id}\"\nquery = \"key\"\n";
    let proxy = start_proxy(origin.addr, dir.path(), rule).await;
    let a = get(proxy.local_addr(), "/download_batch_results/Q-2?v=1").await;
    let b = get(proxy.local_addr(), "/download_batch_results/Q-2?v=2").await;
    let a2 = get(proxy.local_addr(), "/download_batch_results/Q-2?v=1").await;
    assert_eq!(a.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(b.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(a2.cache_status(), "lotecache; hit");
    assert!(proxy.store().get("Q-2_resultados.json?v=1").is_some());
    let targets: Vec<String> = origin.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/download_batch_results/Q-2?v=1", "/download_batch_results/Q-2?v=2"]);
}

#[tokio::test]
async fn the_fill_request_is_rebuilt_and_drops_range_conditionals_and_encoding() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let req = http::Request::get(format!("http://{}/download_batch_results/%52-1", proxy.local_addr()))
        .header("range", "bytes=0-10")
        .header("if-none-match", "\"x\"")
        .header("accept-encoding", "gzip")
        .header("x-forwarded-host", "evil.example")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let got = crate::support::send(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &document("R-1"));
    let seen = &origin.seen()[0];
    assert_eq!(seen.target, "/download_batch_results/R-1");
    let names: Vec<&str> = seen.headers.iter().map(|(k, _)| k.as_str()).collect();
    for dropped in ["range", "if-none-match", "accept-encoding"] {
        assert!(!names.contains(&dropped), "{dropped} reached the origin: {names:?}");
    }
    let xfh = seen.headers.iter().find(|(k, _)| k == "x-forwarded-host").map(|(_, v)| v.as_str());
    assert_eq!(xfh, Some(proxy.local_addr().to_string().as_str()));
}
