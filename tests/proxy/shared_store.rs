//! The shared store's degradation: when its endpoints refuse connections or never answer,
//! every request the origin can answer is still answered, the failure is counted and
//! `/readyz` reports it. (The shared store working — promotion, write-through, corruption,
//! a node or a replica lost — is tested against a real Garage cluster in tests/scaleout.)

use crate::support::{batch, get, origin::*, send, start_proxy, start_proxy_admin, Got};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

const NO_DELAY: Duration = Duration::ZERO;

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

async fn admin_get(addr: SocketAddr, path: &str) -> Got {
    send(Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap()).await
}

fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
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
    assert_eq!(miss.cache_status(), "lotecache; fwd=uri-miss; stored");
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
    assert_eq!(metric(&text, "lotecache_shared_up"), 0.0);
    // While it is down, requests do not wait on it: no lookup, no write-through.
    assert_eq!(metric(&text, "lotecache_shared_ops_total{op=\"probe\",result=\"error\"}"), 1.0);
    assert_eq!(metric(&text, "lotecache_shared_ops_total{op=\"get-record\",result=\"error\"}"), 0.0);
    assert_eq!(metric(&text, "lotecache_shared_ops_total{op=\"put-record\",result=\"skipped\"}"), 1.0);
    assert_eq!(metric(&text, "lotecache_requests_total{outcome=\"miss\"}"), 1.0);
    assert_eq!(metric(&text, "lotecache_requests_total{outcome=\"hit\"}"), 1.0);
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
    assert_eq!(get(proxy.local_addr(), &batch("SH-3")).await.cache_status(), "lotecache; fwd=uri-miss; stored");
    assert_eq!(origin.generations("SH-3"), 2);
}
