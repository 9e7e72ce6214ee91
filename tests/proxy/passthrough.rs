//! Requests no rule caches are forwarded transparently.

use crate::support::{origin::*, send, start_proxy};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

#[tokio::test]
async fn pass_through_keeps_method_query_headers_and_bodies() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let upload: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let req = Request::put(format!("http://{}/api/lotes/7?estado=en_proceso&x=%20y", proxy.local_addr()))
        .header("x-custom", "uno")
        .header("authorization", "Bearer t0ken")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .body(Full::new(Bytes::from(upload.clone())))
        .unwrap();
    let got = send(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["x-origin"], "echo");
    assert_eq!(got.headers["via"], "1.1 lotecache");
    assert!(got.headers.get("cache-status").is_none());

    let seen = &origin.seen()[0];
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.target, "/api/lotes/7?estado=en_proceso&x=%20y");
    assert_eq!(seen.body, upload);
    let header = |name: &str| seen.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(header("x-custom").as_deref(), Some("uno"));
    assert_eq!(header("authorization").as_deref(), Some("Bearer t0ken"));
    assert_eq!(header("x-hop"), None);
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(header("via").as_deref(), Some("1.1 lotecache"));
    // The echo carries the body back: the response direction streams too.
    assert_eq!(got.json()["body"].as_str().unwrap().len(), 3_000_000);
}

#[tokio::test]
async fn origin_statuses_on_pass_through_are_returned_as_sent() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    origin.set("P-1", Behavior::Status(503));
    // POST on the batch path is not a cache method: it passes through.
    let req = Request::post(format!("http://{}/download_batch_results/P-1", proxy.local_addr()))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let got = send(req).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(got.headers.get("cache-status").is_none());
    assert!(proxy.store().is_empty());
}
