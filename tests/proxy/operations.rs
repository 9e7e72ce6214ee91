//! Operations: admin API, metrics, invalidation (purge, TTL, stale-if-error), size cap and
//! eviction, garbage collection, the `cache` commands, logs, reload and shutdown.

use crate::support::process::{serve, serve_logging, BIN};
use crate::support::{admin, batch, get, metric, origin::*, start_proxy, start_proxy_admin};
use bytes::Bytes;
use http::{Method, StatusCode};
use std::time::Duration;

const TOKEN: &str = "s3cret-admin-token";

#[tokio::test]
async fn health_readiness_and_metrics_are_served_on_the_admin_port() {
    let origin = TestOrigin::start().await;
    origin.set("O-1", Behavior::Ok { delay: Duration::from_millis(200), pieces: 1, gap: NO_DELAY });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let a = proxy.admin_addr();
    assert_ne!(a, proxy.local_addr());
    assert_eq!(admin(a, Method::GET, "/healthz", None, "").await.json()["status"], "ok");
    let ready = admin(a, Method::GET, "/readyz", None, "").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["origin"], "reachable");

    get(proxy.local_addr(), &batch("O-1")).await;
    get(proxy.local_addr(), &batch("O-1")).await;
    get(proxy.local_addr(), &batch("..")).await;
    get(proxy.local_addr(), "/monitoreo").await;
    let m = admin(a, Method::GET, "/metrics", None, "").await;
    assert!(m.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = String::from_utf8(m.bytes().to_vec()).unwrap();
    assert_eq!(metric(&text, "lotecache_requests_total{outcome=\"miss\"}").expect("the sample is exposed"), 1.0);
    assert_eq!(metric(&text, "lotecache_requests_total{outcome=\"hit\"}").expect("the sample is exposed"), 1.0);
    assert_eq!(metric(&text, "lotecache_requests_total{outcome=\"rejected\"}").expect("the sample is exposed"), 1.0);
    assert_eq!(metric(&text, "lotecache_requests_total{outcome=\"pass\"}").expect("the sample is exposed"), 1.0);
    assert_eq!(metric(&text, "lotecache_stored_total").expect("the sample is exposed"), 1.0);
    assert_eq!(metric(&text, "lotecache_store_entries").expect("the sample is exposed"), 1.0);
    assert_eq!(metric(&text, "lotecache_store_bytes").expect("the sample is exposed"), document("O-1").len() as f64);
    assert_eq!(metric(&text, "lotecache_fills_in_flight").expect("the sample is exposed"), 0.0);
    assert!(metric(&text, "lotecache_origin_seconds_saved_total").expect("the sample is exposed") >= 0.2);
    assert_eq!(metric(&text, "lotecache_origin_response_seconds_count").expect("the sample is exposed"), 2.0);
}

#[tokio::test]
async fn readiness_fails_while_the_origin_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = start_proxy(closed, dir.path(), "").await;
    let ready = admin(proxy.admin_addr(), Method::GET, "/readyz", None, "").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["origin"], "unreachable");
}

#[tokio::test]
async fn mutating_endpoints_are_refused_when_no_token_is_configured() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    get(proxy.local_addr(), &batch("O-2")).await;
    for (method, path, body) in
        [(Method::DELETE, "/entries/O-2_resultados.json", ""), (Method::POST, "/purge", r#"{"all":true}"#)]
    {
        let got = admin(proxy.admin_addr(), method, path, Some("anything"), body).await;
        assert_eq!(got.status, StatusCode::FORBIDDEN);
        assert!(got.json()["detail"].as_str().unwrap().contains("LOTECACHE_ADMIN_TOKEN"));
    }
    assert_eq!(proxy.store().len(), 1);
}

#[tokio::test]
async fn entries_are_listed_and_removed_only_with_the_right_bearer_token() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy_admin(origin.addr, dir.path(), &format!("token = \"{TOKEN}\""), "").await;
    let (p, a) = (proxy.local_addr(), proxy.admin_addr());
    get(p, &batch("O-3")).await;
    get(p, &batch("O-3")).await;
    get(p, &batch("O-4")).await;

    let list = admin(a, Method::GET, "/entries?limit=1&offset=1", None, "").await.json();
    assert_eq!(list["total"], 2);
    assert_eq!(list["entries"].as_array().unwrap().len(), 1);
    assert_eq!(list["entries"][0]["key"], "O-4_resultados.json");
    let one = admin(a, Method::GET, "/entries/O-3_resultados.json", None, "").await.json();
    assert_eq!(one["lote_id"], "O-3");
    assert_eq!(one["size"], document("O-3").len());
    assert_eq!(one["hits"], 1);
    assert!(one["last_hit"].is_string());
    assert_eq!(one["sha256"].as_str().unwrap().len(), 64);

    for token in [None, Some("wrong")] {
        let got = admin(a, Method::DELETE, "/entries/O-3_resultados.json", token, "").await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
        assert_eq!(got.headers["www-authenticate"], "Bearer");
    }
    let deleted = admin(a, Method::DELETE, "/entries/O-3_resultados.json", Some(TOKEN), "").await;
    assert_eq!(deleted.json()["removed"][0], "O-3_resultados.json");
    assert_eq!(admin(a, Method::GET, "/entries/O-3_resultados.json", None, "").await.status, StatusCode::NOT_FOUND);
    let again = get(p, &batch("O-3")).await;
    assert_eq!(again.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(origin.generations("O-3"), 2);
}

#[tokio::test]
async fn purge_by_lote_id_makes_the_next_request_a_miss() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy_admin(origin.addr, dir.path(), &format!("token = \"{TOKEN}\""), "").await;
    get(proxy.local_addr(), &batch("O-5")).await;
    get(proxy.local_addr(), &batch("O-6")).await;
    let bad = admin(proxy.admin_addr(), Method::POST, "/purge", Some(TOKEN), r#"{"nothing":1}"#).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let purged = admin(proxy.admin_addr(), Method::POST, "/purge", Some(TOKEN), r#"{"lote_id":"O-5"}"#).await;
    assert_eq!(purged.json()["removed"], serde_json::json!(["O-5_resultados.json"]));
    assert_eq!(get(proxy.local_addr(), &batch("O-5")).await.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(get(proxy.local_addr(), &batch("O-6")).await.cache_status(), "lotecache; hit");
    let all = admin(proxy.admin_addr(), Method::POST, "/purge", Some(TOKEN), r#"{"all":true}"#).await;
    assert_eq!(all.json()["removed"].as_array().unwrap().len(), 2);
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn a_purge_during_a_fill_keeps_what_that_fill_fetched_out_of_the_cache() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy_admin(origin.addr, dir.path(), &format!("token = \"{TOKEN}\""), "").await;
    let p = proxy.local_addr();
    // The first generation is slow; the batch is reprocessed and purged meanwhile.
    origin.set("O-P", Behavior::Ok { delay: Duration::from_millis(800), pieces: 1, gap: NO_DELAY });
    let first = tokio::spawn(async move { get(p, &batch("O-P")).await });
    assert!(crate::support::wait_until(Duration::from_secs(5), || origin.generations("O-P") == 1).await);
    let purged = admin(proxy.admin_addr(), Method::POST, "/purge", Some(TOKEN), r#"{"lote_id":"O-P"}"#).await;
    assert_eq!(purged.status, StatusCode::OK);
    let reprocessed = Bytes::from(lotecache::sample_origin::batch_document("O-P", 6000));
    assert_ne!(reprocessed, document("O-P"));
    origin.set("O-P", Behavior::Custom(reprocessed.clone()));

    // A request after the purge does not join the fill started before it: a new generation.
    let second = get(p, &batch("O-P")).await;
    assert_eq!((second.status, second.cache_status()), (StatusCode::OK, "lotecache; fwd=uri-miss"));
    assert_eq!(second.bytes(), &reprocessed);
    assert_eq!(origin.generations("O-P"), 2);
    // The first request still gets its whole document, but it is not what the cache keeps.
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.bytes(), &document("O-P"));
    let third = get(p, &batch("O-P")).await;
    assert_eq!((third.cache_status(), third.bytes()), ("lotecache; hit", &reprocessed));
    assert_eq!(origin.generations("O-P"), 2);
}

#[tokio::test]
async fn a_fill_purged_before_its_commit_is_not_stored_and_says_why() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy_admin(origin.addr, dir.path(), &format!("token = \"{TOKEN}\""), "").await;
    origin.set("O-Q", Behavior::Ok { delay: Duration::from_millis(500), pieces: 1, gap: NO_DELAY });
    let p = proxy.local_addr();
    let first = tokio::spawn(async move { get(p, &batch("O-Q")).await });
    assert!(crate::support::wait_until(Duration::from_secs(5), || origin.generations("O-Q") == 1).await);
    let purged = admin(proxy.admin_addr(), Method::POST, "/purge", Some(TOKEN), r#"{"all":true}"#).await;
    assert_eq!(purged.status, StatusCode::OK);
    let first = first.await.unwrap();
    assert_eq!(first.bytes(), &document("O-Q"));
    assert!(proxy.store().get("O-Q_resultados.json").is_none(), "the purged fill stored nothing");
    let metrics = admin(proxy.admin_addr(), Method::GET, "/metrics", None, "").await;
    let text = String::from_utf8(metrics.bytes().to_vec()).unwrap();
    assert_eq!(metric(&text, "lotecache_not_stored_total{reason=\"purged\"}").expect("the sample is exposed"), 1.0);
    let again = get(p, &batch("O-Q")).await;
    assert_eq!(again.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(origin.generations("O-Q"), 2);
}

const TTL_RULE: &str = "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{lote_id}\"\nttl = \"1s\"\n";

#[tokio::test]
async fn an_entry_past_its_ttl_is_refetched() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), TTL_RULE).await;
    get(proxy.local_addr(), &batch("T-1")).await;
    assert_eq!(get(proxy.local_addr(), &batch("T-1")).await.cache_status(), "lotecache; hit");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = get(proxy.local_addr(), &batch("T-1")).await;
    assert_eq!(after.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(after.bytes(), &document("T-1"));
    assert_eq!(get(proxy.local_addr(), &batch("T-1")).await.cache_status(), "lotecache; hit");
    assert_eq!(origin.generations("T-1"), 2);
}

#[tokio::test]
async fn an_expired_entry_is_served_stale_when_the_origin_fails_or_answers_5xx() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), TTL_RULE).await;
    get(proxy.local_addr(), &batch("T-2")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for (behavior, status) in [(Behavior::Status(500), 500), (Behavior::Refuse, 502)] {
        origin.set("T-2", behavior);
        let got = get(proxy.local_addr(), &batch("T-2")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.bytes(), &document("T-2"));
        assert_eq!(
            got.cache_status(),
            format!("lotecache; hit; fwd=stale; fwd-status={status}; detail=stale-if-error")
        );
    }
}

#[tokio::test]
async fn an_expired_entry_is_served_stale_while_the_origin_is_down() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), TTL_RULE).await;
    get(proxy.local_addr(), &batch("T-4")).await;
    proxy.shutdown(Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The same store in front of an origin that is gone: nothing listens on the port.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = start_proxy(down, dir.path(), TTL_RULE).await;
    let got = get(proxy.local_addr(), &batch("T-4")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &document("T-4"));
    assert_eq!(got.cache_status(), "lotecache; hit; fwd=stale; fwd-status=502; detail=stale-if-error");
}

#[tokio::test]
async fn without_stale_if_error_the_origin_failure_is_passed_on() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), &format!("{TTL_RULE}stale_if_error = false\n")).await;
    get(proxy.local_addr(), &batch("T-3")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    origin.set("T-3", Behavior::Status(500));
    let got = get(proxy.local_addr(), &batch("T-3")).await;
    assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss; detail=origin-status-500");
}

#[tokio::test]
async fn eviction_keeps_the_store_under_max_size_and_keeps_recently_used_entries() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "max_size = \"100MiB\"\n").await;
    let p = proxy.local_addr();
    for id in ["M-A-100kb", "M-B-100kb", "M-C-100kb"] {
        get(p, &batch(id)).await;
        crate::support::compression_settled(&proxy).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Room for three and a half entries, their compressed variants counted.
    let per = proxy.store().entries().iter().map(|e| e.stored_bytes()).max().unwrap();
    assert!(proxy.store().entries().iter().all(|e| e.variants.len() == 2));
    let cap = per * 3 + per / 2;
    proxy.store().set_max_size(cap);
    assert_eq!(get(p, &batch("M-A-100kb")).await.cache_status(), "lotecache; hit"); // A is now the most recent
    get(p, &batch("M-D-100kb")).await; // over the cap: B, the least recently used, goes
    let keys: Vec<String> = proxy.store().entries().iter().map(|e| e.key.clone()).collect();
    assert_eq!(keys, ["M-A-100kb_resultados.json", "M-C-100kb_resultados.json", "M-D-100kb_resultados.json"]);
    assert!(proxy.store().bytes() <= cap);
    assert_eq!(get(p, &batch("M-B-100kb")).await.cache_status(), "lotecache; fwd=uri-miss");
    // A batch larger than the whole cap is served, and said not to be kept.
    let huge = get(p, &batch("M-E-800kb")).await;
    assert_eq!(huge.bytes(), &document("M-E-800kb"));
    assert_eq!(huge.cache_status(), "lotecache; fwd=uri-miss; detail=too-large");
    assert!(proxy.store().get("M-E-800kb_resultados.json").is_none());
}

#[tokio::test]
async fn gc_removes_unreferenced_content_but_never_content_being_read() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    // memory_tier off: the reader streams from the file, holding it open.
    let extra = "gc_grace = \"1ms\"\nmemory_tier = \"off\"\n";
    let proxy = start_proxy_admin(origin.addr, dir.path(), &format!("token = \"{TOKEN}\""), extra).await;
    let (p, a) = (proxy.local_addr(), proxy.admin_addr());
    get(p, &batch("GC-read-4mb")).await;
    get(p, &batch("GC-gone")).await;
    crate::support::compression_settled(&proxy).await;
    let reading_path = proxy.store().get("GC-read-4mb_resultados.json").unwrap().path.clone();
    let gone_path = proxy.store().get("GC-gone_resultados.json").unwrap().path.clone();

    // A slow reader holds the large entry open; then both entries are purged.
    use tokio::io::AsyncReadExt;
    let mut slow = crate::support::raw::slow_reader(p, &batch("GC-read-4mb")).await;
    let mut first = vec![0u8; 1024];
    slow.read_exact(&mut first).await.unwrap();
    admin(a, Method::POST, "/purge", Some(TOKEN), r#"{"all":true}"#).await;
    tokio::time::sleep(Duration::from_millis(10)).await;

    let report = admin(a, Method::POST, "/gc", Some(TOKEN), "").await.json();
    // GC-gone's body (a small document: no variants), and GC-read-4mb's br and gzip variants.
    assert_eq!(report["removed_files"], 3);
    assert!(!gone_path.exists(), "unreferenced content is collected");
    assert!(reading_path.exists(), "content being read is never collected");

    let mut rest = Vec::new();
    slow.read_to_end(&mut rest).await.unwrap_or_default();
    let mut received = first;
    received.extend_from_slice(&rest);
    let body_start = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(&received[body_start..], &document("GC-read-4mb")[..], "the reader got the whole, intact body");

    let report = admin(a, Method::POST, "/gc", Some(TOKEN), "").await.json();
    assert_eq!(report["removed_files"], 1);
    assert!(!reading_path.exists(), "collected once the read ended");
}

fn cli(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("{args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code(), json)
}

#[tokio::test]
async fn cache_commands_list_count_purge_collect_and_export_byte_identical_files() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    for id in ["X-1", "X-2-200kb", "X-3"] {
        get(proxy.local_addr(), &batch(id)).await;
    }
    crate::support::compression_settled(&proxy).await;
    proxy.shutdown(Duration::from_secs(1)).await;
    let d = dir.path().to_str().unwrap();

    let (code, ls) = cli(&["cache", "ls", "--json", "--cache-dir", d]);
    assert_eq!(code, Some(0));
    assert_eq!(ls.as_array().unwrap().len(), 3);
    assert_eq!(ls[1]["lote_id"], "X-2-200kb");

    let out = tempfile::tempdir().unwrap();
    let (code, report) = cli(&["cache", "export", "--json", "--cache-dir", d, out.path().to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert_eq!(report["exported"].as_array().unwrap().len(), 3);
    for id in ["X-1", "X-2-200kb", "X-3"] {
        let file = out.path().join(format!("{id}_resultados.json"));
        assert_eq!(std::fs::read(&file).unwrap(), document(id), "{}", file.display());
    }
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 3, "no temp files left");

    let (code, purged) = cli(&["cache", "purge", "--json", "--cache-dir", d, "X-1"]);
    assert_eq!((code, purged["removed"][0].as_str()), (Some(0), Some("X-1_resultados.json")));
    let (_, stats) = cli(&["cache", "stats", "--json", "--cache-dir", d]);
    // X-1's body (a 6 KB document gets no compressed variants).
    assert_eq!((stats["entries"].as_u64(), stats["unreferenced_files"].as_u64()), (Some(2), Some(1)));
    assert_eq!(stats["variants"], 2, "X-2-200kb's br and gzip");
    let (code, gc) = cli(&["cache", "gc", "--json", "--cache-dir", d]);
    assert_eq!((code, gc["removed_files"].as_u64()), (Some(0), Some(1)));
    assert!(gc["compacted_buckets"].as_u64() >= Some(1), "the purged key's bucket is compacted away: {gc}");
    let (_, ls) = cli(&["cache", "ls", "--json", "--cache-dir", d]);
    assert_eq!(ls.as_array().unwrap().len(), 2, "compaction keeps live entries");
    let (_, stats) = cli(&["cache", "stats", "--json", "--cache-dir", d]);
    assert_eq!(stats["unreferenced_files"], 0);
}

#[tokio::test]
async fn cache_purge_refuses_while_a_server_owns_the_store_and_points_to_the_admin_api() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let _server = serve(origin.addr, dir.path(), &[]).await;
    let out = std::process::Command::new(BIN)
        .args(["cache", "purge", "--cache-dir", dir.path().to_str().unwrap(), "--all"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another lotecache process") && err.contains("/purge"), "{err}");
}

#[tokio::test]
async fn cache_warm_requests_every_listed_batch_through_the_proxy() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    get(proxy.local_addr(), &batch("W-1")).await;
    let list = dir.path().join("ids.txt");
    std::fs::write(&list, "# batches to warm\nW-1\nW-2\n\nW-3\nbad..id/\n").unwrap();
    let via = format!("http://{}", proxy.local_addr());
    let args: Vec<String> = ["cache", "warm", "--json", "--via", &via, "--concurrency", "2", list.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    // The proxy accepts on this test's runtime: wait for the command off it.
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(BIN).args(args).output().unwrap())
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "one id failed");
    assert_eq!(report["requested"], 4);
    assert_eq!(report["hit"], 1);
    assert_eq!(report["stored"], 2);
    assert_eq!(report["failed"].as_array().unwrap().len(), 1);
    assert!(proxy.store().get("W-3_resultados.json").is_some());
}

#[tokio::test]
async fn reload_with_a_bad_file_keeps_the_old_rules_and_a_good_one_applies_without_a_restart() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lotecache.toml");
    let rule = |query: &str| {
        format!("[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{{lote_id}}\"\nquery = \"{query}\"\n")
    };
    std::fs::write(&config, rule("reject")).unwrap();
    let cache = dir.path().join("cache");
    let log = dir.path().join("log.txt");
    let server = serve_logging(origin.addr, &cache, &["--config", config.to_str().unwrap()], Some(&log)).await;
    let q = "/download_batch_results/R-1?v=1";
    assert_eq!(get(server.addr(), q).await.status, StatusCode::BAD_REQUEST);

    std::fs::write(&config, "[[rules]]\nname = \"b\"\npath = \"no-slash\"\n").unwrap();
    server.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(server.addr(), q).await.status, StatusCode::BAD_REQUEST, "old rules still apply");
    assert_eq!(get(server.addr(), &batch("R-1")).await.status, StatusCode::OK);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("config reload rejected") && logs.contains("rules.path"), "{logs}");

    std::fs::write(&config, rule("key")).unwrap();
    server.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let keyed = get(server.addr(), q).await;
    assert_eq!(keyed.status, StatusCode::OK);
    assert_eq!(keyed.cache_status(), "lotecache; fwd=uri-miss");
}

#[tokio::test]
async fn sigterm_during_a_fill_completes_it_then_exits_0_leaving_no_temp_files() {
    let origin = TestOrigin::start().await;
    origin.set("Q-2mb", Behavior::Ok { delay: NO_DELAY, pieces: 8, gap: Duration::from_millis(100) });
    let dir = tempfile::tempdir().unwrap();
    let server = serve(origin.addr, dir.path(), &[]).await;
    let addr = server.addr();
    let download = tokio::spawn(async move { get(addr, &batch("Q-2mb")).await });
    tokio::time::sleep(Duration::from_millis(250)).await;
    server.signal("TERM");
    let got = download.await.unwrap();
    assert_eq!(got.bytes(), &document("Q-2mb"));
    let code = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert_eq!(code, Some(0));
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).map(|d| d.count()).unwrap_or(0), 0);
    let server = serve(origin.addr, dir.path(), &[]).await;
    assert_eq!(get(server.addr(), &batch("Q-2mb")).await.cache_status(), "lotecache; hit");
}

#[tokio::test]
async fn json_logs_have_one_access_line_per_cache_request() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.json");
    let cache = dir.path().join("cache");
    let server = serve_logging(origin.addr, &cache, &["--log-format", "json"], Some(&log)).await;
    get(server.addr(), &batch("J-1")).await;
    get(server.addr(), &batch("J-1")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect();
    let access: Vec<&serde_json::Value> = lines.iter().filter(|l| l["target"] == "lotecache::access").collect();
    assert_eq!(access.len(), 2, "{text}");
    let hit = &access[1]["fields"];
    assert_eq!(hit["lote_id"], "J-1");
    assert_eq!(hit["status"], 200);
    assert_eq!(hit["cache_status"], "lotecache; hit");
    assert_eq!(hit["bytes"], document("J-1").len());
    assert_eq!(hit["end"], "complete");
    assert!(hit["total_ms"].is_u64());
    assert!(access[0]["fields"]["origin_ms"].is_u64());
    assert_eq!(access[0]["fields"]["end"], "complete");
}

/// The `Cpus_allowed_list` of a `/proc/.../status` file, if it is still there.
fn cpus_allowed(status: std::path::PathBuf) -> Option<String> {
    let text = std::fs::read_to_string(status).ok()?;
    text.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|l| l.trim().to_string())
}

/// The cores each `tokio-rt-worker` thread of `pid` may run on.
fn runtime_thread_cores(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().map(|t| t.unwrap().path());
    tasks
        .filter(|dir| std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim() == "tokio-rt-worker")
        .filter_map(|dir| cpus_allowed(dir.join("status")))
        .collect()
}

/// Serves misses (the store's writes start blocking-pool threads) and many concurrent hits,
/// so that both workers serve requests; returns the runtime threads' cores.
async fn cores_after_traffic(pin: bool) -> (Vec<String>, String) {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lotecache.toml");
    std::fs::write(&config, format!("[server]\nworkers = 2\npin_workers = {pin}\n")).unwrap();
    let proxy = serve(origin.addr, &dir.path().join("cache"), &["--config", config.to_str().unwrap()]).await;
    for id in ["PIN-1", "PIN-2", "PIN-3"] {
        assert_eq!(get(proxy.addr(), &batch(id)).await.status, StatusCode::OK);
    }
    let hits = (0..200).map(|i| {
        let addr = proxy.addr();
        tokio::spawn(async move { get(addr, &batch(["PIN-1", "PIN-2", "PIN-3"][i % 3])).await.status })
    });
    for hit in futures_util::future::join_all(hits).await {
        assert_eq!(hit.unwrap(), StatusCode::OK);
    }
    let all = cpus_allowed(format!("/proc/{}/status", proxy.pid()).into()).unwrap();
    (runtime_thread_cores(proxy.pid()), all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pin_workers_each_worker_gets_a_core_of_its_own_and_other_threads_keep_them_all() {
    let (cores, all) = cores_after_traffic(true).await;
    let pinned: Vec<&String> = cores.iter().filter(|c| **c != all).collect();
    let allowed = std::thread::available_parallelism().unwrap().get();
    if allowed >= 2 {
        // Two workers, two distinct single cores; every other runtime thread (the blocking
        // pool the misses used) has the process's whole mask back.
        assert_eq!(pinned.len(), 2, "threads' cores: {cores:?}, process: {all}");
        assert_ne!(pinned[0], pinned[1]);
        assert!(pinned.iter().all(|c| c.parse::<usize>().is_ok()), "{pinned:?}");
        assert!(cores.len() > 2, "the misses ran on blocking-pool threads: {cores:?}");
    } else {
        // One core: pinned or not, every thread has that core.
        assert!(cores.iter().all(|c| *c == all), "threads' cores: {cores:?}, process: {all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pin_workers_no_runtime_thread_is_pinned() {
    let (cores, all) = cores_after_traffic(false).await;
    assert!(cores.iter().all(|c| *c == all), "threads' cores: {cores:?}, process: {all}");
}
