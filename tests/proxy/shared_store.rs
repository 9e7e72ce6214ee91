//! The shared store's degradation: when its endpoints refuse connections or never answer,
//! every request the origin can answer is still answered, the failure is counted and
//! `/readyz` reports it. (The shared store working — promotion, write-through, corruption,
//! a node or a replica lost — is tested against a real Garage cluster in tests/scaleout.)

use crate::support::{admin_get, batch, get, metric, origin::*, send, start_proxy, start_proxy_admin};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

fn shared_toml(endpoints: &[String]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[shared]\nurl = \"s3://lotecache/batches\"\nendpoints = [{}]\nregion = \"garage\"\n\
         access_key_id = \"GK0000000000000000000000\"\nsecret_access_key = \"{}\"\n\
         timeout = \"500ms\"\nconnect_timeout = \"300ms\"\nprobe_interval = \"1h\"\n",
        list.join(", "),
        "0".repeat(64)
    )
}

fn closed_endpoint() -> String {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    format!("http://{addr}")
}

#[tokio::test]
async fn an_unreachable_shared_store_never_fails_a_request_and_is_not_waited_on_while_down() {
    let origin = TestOrigin::start().await;
    origin.set("SH-1", Behavior::Ok { delay: NO_DELAY, pieces: 1, gap: NO_DELAY });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), &shared_toml(&[closed_endpoint(), closed_endpoint()])).await;
    // The probe at start finds it down.
    let admin = proxy.admin_addr();
    for _ in 0..100 {
        if admin_get(admin, "/readyz").await.json()["shared_store"]["state"] == "unreachable" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let miss = get(proxy.local_addr(), &batch("SH-1")).await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_eq!(miss.bytes(), &document("SH-1"));
    assert_eq!(miss.cache_status(), "lotecache; fwd=uri-miss");
    let hit = get(proxy.local_addr(), &batch("SH-1")).await;
    assert_eq!((hit.status, hit.cache_status()), (StatusCode::OK, "lotecache; hit"));
    assert_eq!(hit.bytes(), &document("SH-1"));
    assert_eq!(origin.generations("SH-1"), 1);

    let ready = admin_get(proxy.admin_addr(), "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "the local tier and the origin still serve");
    let shared = &ready.json()["shared_store"];
    assert_eq!(shared["state"], "unreachable");
    assert_eq!(shared["location"], "s3://lotecache/batches");
    assert!(shared["last_error"].as_str().unwrap().contains("127.0.0.1"), "{shared}");

    let text = String::from_utf8(admin_get(proxy.admin_addr(), "/metrics").await.bytes().to_vec()).unwrap();
    assert_eq!(metric(&text, "lotecache_shared_up").unwrap_or(0.0), 0.0);
    // While it is down, requests do not wait on it: no lookup, no write-through.
    assert_eq!(metric(&text, "lotecache_shared_ops_total{op=\"probe\",result=\"error\"}").unwrap_or(0.0), 1.0);
    assert_eq!(metric(&text, "lotecache_shared_ops_total{op=\"get-record\",result=\"error\"}").unwrap_or(0.0), 0.0);
    assert_eq!(metric(&text, "lotecache_shared_ops_total{op=\"put-record\",result=\"skipped\"}").unwrap_or(0.0), 1.0);
    assert_eq!(metric(&text, "lotecache_requests_total{outcome=\"miss\"}").unwrap_or(0.0), 1.0);
    assert_eq!(metric(&text, "lotecache_requests_total{outcome=\"hit\"}").unwrap_or(0.0), 1.0);
    proxy.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_shared_store_endpoint_that_never_answers_is_skipped_after_its_deadline() {
    let origin = TestOrigin::start().await;
    origin.set("SH-2", Behavior::Ok { delay: NO_DELAY, pieces: 1, gap: NO_DELAY });
    // Accepts connections (the kernel's backlog) and never answers, like a node that hangs.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), &shared_toml(&[silent_url, closed_endpoint()])).await;

    let got = tokio::time::timeout(Duration::from_secs(20), get(proxy.local_addr(), &batch("SH-2")))
        .await
        .expect("a hanging shared store does not hang the request");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &document("SH-2"));
    assert_eq!(origin.generations("SH-2"), 1);
    let ready = admin_get(proxy.admin_addr(), "/readyz").await;
    assert!(
        ready.json()["shared_store"]["last_error"].as_str().unwrap().contains("no answer within"),
        "{}",
        ready.json()
    );
    drop(silent);
}

#[tokio::test]
async fn a_purge_that_cannot_reach_the_shared_store_says_so_with_502() {
    let origin = TestOrigin::start().await;
    origin.set("SH-3", Behavior::Ok { delay: NO_DELAY, pieces: 1, gap: NO_DELAY });
    let dir = tempfile::tempdir().unwrap();
    let proxy =
        start_proxy_admin(origin.addr, dir.path(), "token = \"t0ken\"", &shared_toml(&[closed_endpoint()])).await;
    get(proxy.local_addr(), &batch("SH-3")).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/purge", proxy.admin_addr()))
        .header("authorization", "Bearer t0ken")
        .body(Full::new(Bytes::from_static(br#"{"lote_id": "SH-3"}"#)))
        .unwrap();
    let purged = send(req).await;
    assert_eq!(purged.status, StatusCode::BAD_GATEWAY);
    let body = purged.json();
    assert_eq!(body["removed"], serde_json::json!(["SH-3_resultados.json"]));
    assert_eq!(body["shared_failed"], serde_json::json!(["SH-3_resultados.json"]));
    // Removed locally all the same: the next request is a miss.
    assert_eq!(get(proxy.local_addr(), &batch("SH-3")).await.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(origin.generations("SH-3"), 2);
}

/// A stand-in S3 endpoint for one fault a real cluster cannot be made to show on demand: it
/// answers the probe with 404, serves `record` for any record name, and for any blob sends
/// the head with the full `Content-Length`, half the body, then stalls.
async fn stalling_s3(record: Vec<u8>, blob: Bytes) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let (record, blob) = (record.clone(), blob.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    buf.drain(..head_end);
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let meta = "ETag: \"e\"\r\nLast-Modified: Wed, 25 Nov 2026 00:00:00 GMT\r\n";
                    if path.contains("/_lotecache/entries/") {
                        let h = format!("HTTP/1.1 200 OK\r\n{meta}Content-Length: {}\r\n\r\n", record.len());
                        let _ = conn.write_all(h.as_bytes()).await;
                        let _ = conn.write_all(&record).await;
                    } else if path.contains("/_lotecache/blobs/") {
                        let h = format!("HTTP/1.1 200 OK\r\n{meta}Content-Length: {}\r\n\r\n", blob.len());
                        let _ = conn.write_all(h.as_bytes()).await;
                        let _ = conn.write_all(&blob[..blob.len() / 2]).await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    } else {
                        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_shared_blob_that_stalls_mid_body_is_abandoned_and_the_origin_answers_in_full() {
    use sha2::Digest;
    let origin = TestOrigin::start().await;
    origin.set("SH-4", Behavior::Ok { delay: NO_DELAY, pieces: 1, gap: NO_DELAY });
    let doc = document("SH-4");
    let record = serde_json::json!({
        "v": 1, "key": "SH-4_resultados.json", "sha256": hex::encode(sha2::Sha256::digest(&doc)),
        "size": doc.len(), "stored_at_ms": 1_700_000_000_000u64,
        "meta": {"v": 1, "lote_id": "SH-4", "status": 200, "headers": [["content-type", "application/json"]], "gen_ms": 5}
    });
    let s3 = stalling_s3(serde_json::to_vec(&record).unwrap(), doc.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), &shared_toml(&[format!("http://{s3}")])).await;

    let got = tokio::time::timeout(Duration::from_secs(20), get(proxy.local_addr(), &batch("SH-4")))
        .await
        .expect("a stalled shared body does not hang the request");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &doc);
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(origin.generations("SH-4"), 1);
    let text = String::from_utf8(admin_get(proxy.admin_addr(), "/metrics").await.bytes().to_vec()).unwrap();
    // The record was read (the write-through of the refetch may read it again, meanwhile).
    assert!(metric(&text, "lotecache_shared_ops_total{op=\"get-record\",result=\"ok\"}").unwrap_or(0.0) >= 1.0);
    assert_eq!(metric(&text, "lotecache_shared_ops_total{op=\"get-blob\",result=\"error\"}").unwrap_or(0.0), 1.0);
}
