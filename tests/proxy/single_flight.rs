//! Single-flight: one generation per batch however many requests, every waiter streamed.

use crate::support::{batch, get, origin::*, request, send, start_proxy, Got};
use http::{Method, StatusCode};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Fires `n` concurrent GETs for `id` and returns the responses.
async fn concurrent(proxy: std::net::SocketAddr, id: &str, n: usize) -> Vec<Got> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn({
                let path = batch(id);
                async move { get(proxy, &path).await }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Whether the proxy's fill registry empties (within a second): a fill announces its end to its
/// subscribers, on whichever worker they are, just before it leaves the registry on its own.
async fn no_fill_left(proxy: &lotecache::RunningProxy) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while !proxy.cache().fills.is_empty() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

fn count(gots: &[Got], cache_status: &str) -> usize {
    gots.iter().filter(|g| g.cache_status() == cache_status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_cold_requests_make_one_generation_and_get_identical_bodies() {
    let origin = TestOrigin::start().await;
    origin.set("SF-1-256kb", Behavior::Ok { delay: Duration::from_millis(300), pieces: 1, gap: NO_DELAY });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let gots = concurrent(proxy.local_addr(), "SF-1-256kb", 100).await;
    let doc = document("SF-1-256kb");
    assert!(gots.iter().all(|g| g.status == StatusCode::OK && g.bytes() == &doc));
    assert_eq!(origin.generations("SF-1-256kb"), 1);
    assert_eq!(count(&gots, "lotecache; fwd=uri-miss"), 1);
    assert_eq!(count(&gots, "lotecache; fwd=uri-miss; collapsed"), 99);
    assert!(no_fill_left(&proxy).await, "the ended fill left the registry");
}

#[tokio::test]
async fn a_joiner_arriving_after_half_the_body_has_streamed_still_gets_the_whole_body() {
    let origin = TestOrigin::start().await;
    origin.set("SF-2-1mb", Behavior::Ok { delay: NO_DELAY, pieces: 4, gap: Duration::from_millis(200) });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let addr = proxy.local_addr();
    let first = tokio::spawn(async move { get(addr, &batch("SF-2-1mb")).await });
    tokio::time::sleep(Duration::from_millis(450)).await; // pieces 1-3 are out
    let late = get(addr, &batch("SF-2-1mb")).await;
    let first = first.await.unwrap();
    assert_eq!(late.cache_status(), "lotecache; fwd=uri-miss; collapsed");
    assert_eq!(late.bytes(), &document("SF-2-1mb"));
    assert_eq!(first.bytes(), &document("SF-2-1mb"));
    assert_eq!(origin.generations("SF-2-1mb"), 1);
}

#[tokio::test]
async fn the_first_client_leaving_mid_body_affects_neither_the_others_nor_the_entry() {
    let origin = TestOrigin::start().await;
    origin.set("SF-3-1mb", Behavior::Ok { delay: NO_DELAY, pieces: 6, gap: Duration::from_millis(100) });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let addr = proxy.local_addr();
    let resp = crate::support::client().request(request(Method::GET, addr, &batch("SF-3-1mb"))).await.unwrap();
    let others = tokio::spawn(async move { concurrent(addr, "SF-3-1mb", 5).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(resp); // the initiator leaves mid-body
    let others = others.await.unwrap();
    assert!(others.iter().all(|g| g.bytes() == &document("SF-3-1mb")));
    let hit = get(addr, &batch("SF-3-1mb")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("SF-3-1mb"));
    assert_eq!(origin.generations("SF-3-1mb"), 1);
}

#[tokio::test]
async fn origin_dying_mid_body_fails_every_subscriber_stores_nothing_and_a_new_request_succeeds() {
    let origin = TestOrigin::start().await;
    origin.set("SF-4", Behavior::Delayed(Duration::from_millis(300), Box::new(Behavior::CutShort { send: 1000 })));
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let gots = concurrent(proxy.local_addr(), "SF-4", 20).await;
    assert!(gots.iter().all(|g| g.status == StatusCode::OK && g.body.is_err()), "every subscriber must see an error");
    assert_eq!(origin.generations("SF-4"), 1);
    assert!(proxy.store().is_empty());
    assert!(no_fill_left(&proxy).await, "the ended fill left the registry");

    origin.set("SF-4", Behavior::Ok { delay: NO_DELAY, pieces: 1, gap: NO_DELAY });
    let again = get(proxy.local_addr(), &batch("SF-4")).await;
    assert_eq!(again.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(again.bytes(), &document("SF-4"));
    assert_eq!(origin.generations("SF-4"), 2);
}

#[tokio::test]
async fn non_cacheable_outcomes_reach_every_joiner_as_sent_and_leave_nothing_behind() {
    let origin = TestOrigin::start().await;
    origin.set("SF-5", Behavior::Delayed(Duration::from_millis(300), Box::new(Behavior::Status(500))));
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let gots = concurrent(proxy.local_addr(), "SF-5", 20).await;
    assert!(gots
        .iter()
        .all(|g| g.status == StatusCode::INTERNAL_SERVER_ERROR && g.bytes().as_ref() == b"{\"error\":\"status 500\"}"));
    assert_eq!(count(&gots, "lotecache; fwd=uri-miss; detail=origin-status-500"), 1);
    assert_eq!(count(&gots, "lotecache; fwd=uri-miss; collapsed"), 19);
    assert_eq!(origin.generations("SF-5"), 1);
    assert!(proxy.store().is_empty());
    assert!(no_fill_left(&proxy).await, "the ended fill left the registry");
}

#[tokio::test]
async fn an_aborted_fill_releases_every_waiter_with_an_error() {
    let origin = TestOrigin::start().await;
    origin.set("SF-6", Behavior::Hang);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let addr = proxy.local_addr();
    let waiters = tokio::spawn(async move { concurrent(addr, "SF-6", 10).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(proxy.cache().fills.abort("SF-6_resultados.json"));
    let gots = tokio::time::timeout(Duration::from_secs(1), waiters).await.expect("waiters released").unwrap();
    for g in &gots {
        assert_eq!(g.status, StatusCode::BAD_GATEWAY);
        assert_eq!(g.json()["error"], "fill aborted");
    }
    assert!(no_fill_left(&proxy).await, "the ended fill left the registry");
}

#[tokio::test]
async fn a_fill_older_than_fill_timeout_is_abandoned_and_the_next_request_starts_afresh() {
    let origin = TestOrigin::start().await;
    // 10 pieces 300 ms apart: never idle for 1 s, but 2.7 s in all.
    origin.set("SF-7", Behavior::Ok { delay: NO_DELAY, pieces: 10, gap: Duration::from_millis(300) });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "fill_timeout = \"1s\"\n").await;
    let got = get(proxy.local_addr(), &batch("SF-7")).await;
    assert!(got.body.is_err());
    assert!(proxy.store().is_empty());
    origin.set("SF-7", Behavior::Ok { delay: NO_DELAY, pieces: 1, gap: NO_DELAY });
    let again = get(proxy.local_addr(), &batch("SF-7")).await;
    assert_eq!(again.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(origin.generations("SF-7"), 2);
}

#[tokio::test]
async fn past_the_replay_buffer_new_requests_wait_for_the_commit_and_read_from_disk() {
    let origin = TestOrigin::start().await;
    origin.set("SF-8-1mb", Behavior::Ok { delay: NO_DELAY, pieces: 8, gap: Duration::from_millis(100) });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "replay_buffer = \"256KiB\"\n").await;
    let addr = proxy.local_addr();
    let first = tokio::spawn(async move { get(addr, &batch("SF-8-1mb")).await });
    tokio::time::sleep(Duration::from_millis(350)).await; // ~384 KiB streamed: past the buffer
    let late = get(addr, &batch("SF-8-1mb")).await;
    assert_eq!(late.cache_status(), "lotecache; fwd=uri-miss; collapsed");
    assert_eq!(late.bytes(), &document("SF-8-1mb"));
    assert_eq!(first.await.unwrap().bytes(), &document("SF-8-1mb"));
    assert_eq!(origin.generations("SF-8-1mb"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_too_far_behind_is_cut_without_hurting_the_others_or_the_entry() {
    let origin = TestOrigin::start().await;
    origin.set(
        "SF-9-12mb",
        Behavior::Ok { delay: Duration::from_millis(200), pieces: 12, gap: Duration::from_millis(20) },
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "replay_buffer = \"1MiB\"\n").await;
    let addr = proxy.local_addr();

    // A client that asks and then does not read, with a tiny receive buffer.
    let mut slow = crate::support::raw::slow_reader(addr, &batch("SF-9-12mb")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let fast = get(addr, &batch("SF-9-12mb")).await;
    let doc = document("SF-9-12mb");
    assert_eq!(fast.bytes(), &doc);
    assert!(proxy.store().get("SF-9-12mb_resultados.json").is_some());

    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the slow client's connection must be closed, not left hanging");
    let head_end = received.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    assert!(received.len() - head_end < doc.len(), "the laggard must not receive a complete body");
    assert_eq!(origin.generations("SF-9-12mb"), 1);
}

#[tokio::test]
async fn a_range_request_on_a_miss_stores_the_whole_object() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let mut req = request(Method::GET, proxy.local_addr(), &batch("SF-10"));
    req.headers_mut().insert("range", "bytes=0-9".parse().unwrap());
    let got = send(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &document("SF-10"));
    let entry = proxy.store().get("SF-10_resultados.json").expect("stored");
    assert_eq!(entry.size, document("SF-10").len() as u64);
}
