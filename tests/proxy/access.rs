//! The access check's decision cache (`[rules.auth]` `cache_ttl`, `deny_ttl`, `cache_entries`):
//! an answer of the backend's check is kept for the exact credentials and batch, so that a
//! user's hits do not each cost the backend a request; the check's own `Cache-Control` says
//! how long; a refusal is kept only when asked to; a kept allow serves while the backend is
//! down, and says so in `Cache-Status`.

use crate::support::origin::*;
use crate::support::{admin, batch, metric, request, send, start_proxy_admin, Got};
use http::{Method, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;

fn rule(auth_extra: &str) -> String {
    format!("[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{{lote_id}}\"\n[rules.auth]\nurl = \"/auth/{{lote_id}}\"\ntimeout = \"1s\"\n{auth_extra}")
}

async fn proxy_with(auth_extra: &str) -> (TestOrigin, tempfile::TempDir, lotecache::RunningProxy) {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy_admin(origin.addr, dir.path(), "token = \"t\"", &rule(auth_extra)).await;
    (origin, dir, proxy)
}

async fn as_user(proxy: SocketAddr, id: &str, cookie: &str) -> Got {
    let mut req = request(Method::GET, proxy, &batch(id));
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    send(req).await
}

fn metrics(proxy: &lotecache::RunningProxy) -> String {
    proxy.store().metrics().render()
}

#[tokio::test]
async fn a_kept_allow_serves_the_users_hits_without_asking_again_and_says_so() {
    let (origin, _dir, proxy) = proxy_with("").await;
    let p = proxy.local_addr();
    let miss = as_user(p, "A-1", "user=ok").await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_eq!(origin.auth_checks(), 1);
    for _ in 0..3 {
        let hit = as_user(p, "A-1", "user=ok").await;
        assert_eq!(hit.cache_status(), "lotecache; hit; access=cached");
        assert_eq!(hit.bytes(), &document("A-1"));
    }
    assert_eq!(origin.auth_checks(), 1, "one check for the user's four requests");
    // Other credentials, or another batch: asked.
    assert_eq!(as_user(p, "A-1", "user=ok; theme=dark").await.cache_status(), "lotecache; hit");
    assert_eq!(as_user(p, "A-2", "user=ok").await.status, StatusCode::OK);
    assert_eq!(origin.auth_checks(), 3);
    // A purge does not touch the decisions: the refetch is not asked about again.
    let purged = admin(proxy.admin_addr(), Method::POST, "/purge", Some("t"), r#"{"lote_id": "A-1"}"#).await;
    assert_eq!(purged.status, StatusCode::OK);
    let refetched = as_user(p, "A-1", "user=ok").await;
    assert_eq!(refetched.cache_status(), "lotecache; fwd=uri-miss; access=cached");
    assert_eq!(origin.auth_checks(), 3);
    assert_eq!(origin.generations("A-1"), 2);
    let m = metrics(&proxy);
    assert_eq!(metric(&m, "lotecache_access_checks_total{result=\"allow\",source=\"asked\"}"), Some(3.0));
    assert_eq!(metric(&m, "lotecache_access_checks_total{result=\"allow\",source=\"cached\"}"), Some(4.0));
    assert_eq!(metric(&m, "lotecache_access_check_seconds_count"), Some(3.0));
}

#[tokio::test]
async fn a_kept_allow_ends_with_its_ttl_and_a_ttl_of_zero_keeps_nothing() {
    let (origin, _dir, proxy) = proxy_with("cache_ttl = \"300ms\"\n").await;
    let p = proxy.local_addr();
    as_user(p, "A-3", "user=ok").await;
    as_user(p, "A-3", "user=ok").await;
    assert_eq!(origin.auth_checks(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(as_user(p, "A-3", "user=ok").await.cache_status(), "lotecache; hit");
    assert_eq!(origin.auth_checks(), 2);

    let (origin, _dir, proxy) = proxy_with("cache_ttl = \"0s\"\n").await;
    for _ in 0..3 {
        assert_eq!(as_user(proxy.local_addr(), "A-3", "user=ok; cc=max-age=60").await.status, StatusCode::OK);
    }
    assert_eq!(origin.auth_checks(), 3, "0 turns the cache off, whatever the check says");
}

#[tokio::test]
async fn the_checks_cache_control_says_how_long_its_answer_is_kept() {
    let (origin, _dir, proxy) = proxy_with("").await;
    let p = proxy.local_addr();
    for _ in 0..3 {
        as_user(p, "A-4", "user=ok; cc=no-store").await;
    }
    assert_eq!(origin.auth_checks(), 3, "no-store: asked every time");
    for _ in 0..3 {
        as_user(p, "A-4", "user=ok; cc=private,+no-cache").await;
    }
    assert_eq!(origin.auth_checks(), 6, "no-cache: asked every time");
    as_user(p, "A-4", "user=ok; cc=max-age=1").await;
    as_user(p, "A-4", "user=ok; cc=max-age=1").await;
    assert_eq!(origin.auth_checks(), 7);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    as_user(p, "A-4", "user=ok; cc=max-age=1").await;
    assert_eq!(origin.auth_checks(), 8, "kept for max-age, not for cache_ttl");
}

#[tokio::test]
async fn a_longer_max_age_than_cache_ttl_is_cut_to_cache_ttl() {
    let (origin, _dir, proxy) = proxy_with("cache_ttl = \"300ms\"\n").await;
    let p = proxy.local_addr();
    as_user(p, "A-8", "user=ok; cc=max-age=86400").await;
    as_user(p, "A-8", "user=ok; cc=max-age=86400").await;
    assert_eq!(origin.auth_checks(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    as_user(p, "A-8", "user=ok; cc=max-age=86400").await;
    assert_eq!(origin.auth_checks(), 2, "a revoked access ends within cache_ttl, whatever the check says");
    // A max-age no clock can add does not break the request either.
    assert_eq!(as_user(p, "A-8", "user=ok; cc=max-age=99999999999999999999").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_kept_refusal_is_replayed_without_the_cookie_it_set() {
    let (origin, _dir, proxy) = proxy_with("deny_ttl = \"5s\"\n").await;
    let p = proxy.local_addr();
    let first = as_user(p, "A-9", "user=nope; sc=fresh-session").await;
    assert_eq!(first.status, StatusCode::FORBIDDEN);
    assert_eq!(first.headers["set-cookie"], "fresh-session", "the asking request gets its own cookie");
    let again = as_user(p, "A-9", "user=nope; sc=fresh-session").await;
    assert_eq!(again.status, StatusCode::FORBIDDEN);
    assert_eq!(again.cache_status(), "lotecache; detail=access-denied; access=cached");
    assert!(again.headers.get("set-cookie").is_none(), "a kept refusal handed out the first asker's cookie");
    assert_eq!(origin.auth_checks(), 1);
}

#[tokio::test]
async fn a_refusal_is_asked_again_unless_deny_ttl_keeps_it() {
    let (origin, _dir, proxy) = proxy_with("").await;
    let p = proxy.local_addr();
    for _ in 0..2 {
        let refused = as_user(p, "A-5", "user=nope").await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert_eq!(refused.cache_status(), "lotecache; detail=access-denied");
    }
    assert_eq!(origin.auth_checks(), 2, "refusals are not kept by default");

    let (origin, _dir, proxy) = proxy_with("deny_ttl = \"5s\"\n").await;
    let p = proxy.local_addr();
    let first = as_user(p, "A-5", "user=nope").await;
    let again = as_user(p, "A-5", "user=nope").await;
    assert_eq!(origin.auth_checks(), 1);
    assert_eq!((first.status, again.status), (StatusCode::FORBIDDEN, StatusCode::FORBIDDEN));
    assert_eq!(again.bytes(), first.bytes(), "the backend's refusal, as it sent it");
    assert_eq!(again.headers["content-type"], "application/json");
    assert_eq!(again.cache_status(), "lotecache; detail=access-denied; access=cached");
    // The kept refusal is this user's: the allowed user is asked, and served.
    assert_eq!(as_user(p, "A-5", "user=ok").await.status, StatusCode::OK);
    assert_eq!(origin.generations("A-5"), 1);
    let m = metrics(&proxy);
    assert_eq!(metric(&m, "lotecache_access_checks_total{result=\"deny\",source=\"cached\"}"), Some(1.0));
}

#[tokio::test]
async fn while_the_backend_is_down_only_a_kept_allow_serves() {
    let (origin, _dir, proxy) = proxy_with("cache_ttl = \"600ms\"\n").await;
    let p = proxy.local_addr();
    assert_eq!(as_user(p, "A-6", "user=ok").await.status, StatusCode::OK);
    origin.set_auth_down(true);
    let kept = as_user(p, "A-6", "user=ok").await;
    assert_eq!(kept.status, StatusCode::OK);
    assert_eq!(kept.cache_status(), "lotecache; hit; access=cached");
    let unknown = as_user(p, "A-6", "user=ok; other=1").await;
    assert_eq!(unknown.status, StatusCode::BAD_GATEWAY, "no kept decision: fail closed");
    assert_eq!(unknown.json()["error"], "access check failed");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(as_user(p, "A-6", "user=ok").await.status, StatusCode::BAD_GATEWAY, "expired: fail closed");
    let m = metrics(&proxy);
    assert_eq!(metric(&m, "lotecache_access_checks_total{result=\"error\",source=\"asked\"}"), Some(2.0));
    // A failure is never kept: the backend back, the next request is asked and served.
    origin.set_auth_down(false);
    assert_eq!(as_user(p, "A-6", "user=ok; other=1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_decision_cache_keeps_at_most_cache_entries_the_least_recently_used_going_first() {
    let (origin, _dir, proxy) = proxy_with("cache_entries = 2\n").await;
    let p = proxy.local_addr();
    for user in ["user=ok; u=a", "user=ok; u=b", "user=ok; u=c"] {
        as_user(p, "A-7", user).await;
    }
    assert_eq!(origin.auth_checks(), 3);
    as_user(p, "A-7", "user=ok; u=c").await;
    as_user(p, "A-7", "user=ok; u=b").await;
    assert_eq!(origin.auth_checks(), 3, "b and c are kept");
    as_user(p, "A-7", "user=ok; u=a").await;
    assert_eq!(origin.auth_checks(), 4, "a was dropped for c");
}
