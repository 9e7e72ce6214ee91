//! Warm on completion: the admin API's `POST /warm` starts a batch's fill without a client
//! (the first click is then a hit), `POST /purge` with `"rewarm": true` fetches a re-processed
//! batch again at once, and a rule's service headers (values from the environment) go with
//! every fill so the backend can authorise lotecache itself.

use crate::support::origin::*;
use crate::support::{admin, batch, get, start_proxy_admin, wait_until, Got};
use http::{Method, StatusCode};
use std::time::Duration;

const TOKEN: &str = "t0ken";

async fn warm(proxy: &lotecache::RunningProxy, body: &str) -> Got {
    admin(proxy.admin_addr(), Method::POST, "/warm", Some(TOKEN), body).await
}

async fn proxy(extra: &str) -> (TestOrigin, tempfile::TempDir, lotecache::RunningProxy) {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy_admin(origin.addr, dir.path(), &format!("token = \"{TOKEN}\""), extra).await;
    (origin, dir, proxy)
}

async fn stored(proxy: &lotecache::RunningProxy, key: &str) -> bool {
    wait_until(Duration::from_secs(10), || proxy.store().get(key).is_some()).await
}

#[tokio::test]
async fn a_warmed_batch_is_a_hit_on_its_first_click() {
    let (origin, _dir, proxy) = proxy("").await;
    let got = warm(&proxy, r#"{"lote_id": "W-1"}"#).await;
    assert_eq!(got.status, StatusCode::ACCEPTED);
    assert_eq!(
        got.json(),
        serde_json::json!({"warmed": [{"lote_id": "W-1", "rule": "batch-results", "result": "started"}]})
    );
    assert!(stored(&proxy, "W-1_resultados.json").await);
    let click = get(proxy.local_addr(), &batch("W-1")).await;
    assert_eq!(click.cache_status(), "lotecache; hit");
    assert_eq!(click.bytes(), &document("W-1"));
    assert_eq!(origin.generations("W-1"), 1, "generated at the warm, not at the click");
}

#[tokio::test]
async fn warming_is_idempotent_and_a_click_meanwhile_joins_the_fill() {
    let (origin, _dir, proxy) = proxy("").await;
    origin.set("W-2", Behavior::Ok { delay: Duration::from_millis(600), pieces: 1, gap: NO_DELAY });
    let first = warm(&proxy, r#"{"lote_ids": ["W-2"]}"#).await;
    assert_eq!(first.json()["warmed"][0]["result"], "started");
    let again = warm(&proxy, r#"{"lote_ids": ["W-2", "W-2"]}"#).await;
    let results: Vec<_> = again.json()["warmed"].as_array().unwrap().iter().map(|w| w["result"].clone()).collect();
    assert_eq!(results, ["in-flight", "in-flight"]);
    let click = get(proxy.local_addr(), &batch("W-2")).await;
    assert_eq!(click.cache_status(), "lotecache; fwd=uri-miss; collapsed", "the click joined the warm's fill");
    assert_eq!(click.bytes(), &document("W-2"));
    assert!(stored(&proxy, "W-2_resultados.json").await);
    assert_eq!(warm(&proxy, r#"{"lote_id": "W-2"}"#).await.json()["warmed"][0]["result"], "stored");
    assert_eq!(origin.generations("W-2"), 1);
}

#[tokio::test]
async fn warm_needs_the_admin_token_and_a_well_formed_request() {
    let (origin, _dir, proxy) = proxy("").await;
    let a = proxy.admin_addr();
    assert_eq!(admin(a, Method::POST, "/warm", None, r#"{"lote_id": "W-3"}"#).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        admin(a, Method::POST, "/warm", Some("wrong"), r#"{"lote_id": "W-3"}"#).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(admin(a, Method::GET, "/warm", Some(TOKEN), "").await.status, StatusCode::METHOD_NOT_ALLOWED);
    for bad in ["", "{}", r#"{"lote_id": 7}"#, r#"{"lote_ids": []}"#, r#"{"lote_ids": ["a", 1]}"#] {
        let got = warm(&proxy, bad).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(got.json()["error"], "bad warm request");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(origin.generations("W-3"), 0);

    let dir = tempfile::tempdir().unwrap();
    let untokened = crate::support::start_proxy(origin.addr, dir.path(), "").await;
    let got = admin(untokened.admin_addr(), Method::POST, "/warm", Some("x"), r#"{"lote_id": "W-3"}"#).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN, "no token configured: the endpoint is off");
}

#[tokio::test]
async fn an_unknown_a_refused_or_an_invalid_batch_is_never_stored() {
    let (origin, _dir, proxy) = proxy("").await;
    origin.set("W-404", Behavior::Status(404));
    origin.set("W-401", Behavior::Status(401));
    let got = warm(&proxy, r#"{"lote_ids": ["W-404", "W-401", "bad!id"]}"#).await;
    let warmed = got.json()["warmed"].clone();
    assert_eq!(warmed[0]["result"], "started");
    assert_eq!(warmed[1]["result"], "started");
    assert_eq!(warmed[2]["result"], "refused");
    assert!(warmed[2]["detail"].as_str().unwrap().contains("lote_id"), "{warmed}");
    assert!(
        wait_until(Duration::from_secs(5), || origin.generations("W-404") == 1 && origin.generations("W-401") == 1)
            .await
    );
    assert!(wait_until(Duration::from_secs(5), || proxy.cache().fills.is_empty()).await);
    assert!(proxy.store().is_empty(), "a refusal or an error of the backend is not stored");
    let m = proxy.store().metrics().render();
    assert!(m.contains("lotecache_not_stored_total{reason=\"origin-status-404\"} 1"), "{m}");
}

#[tokio::test]
async fn purge_with_rewarm_fetches_the_reprocessed_batch_once_before_anyone_asks() {
    let (origin, _dir, proxy) = proxy("").await;
    let p = proxy.local_addr();
    assert_eq!(get(p, &batch("W-5")).await.bytes(), &document("W-5"));
    origin.bump_version("W-5");
    let purged =
        admin(proxy.admin_addr(), Method::POST, "/purge", Some(TOKEN), r#"{"lote_id": "W-5", "rewarm": true}"#).await;
    assert_eq!(purged.status, StatusCode::OK);
    assert_eq!(purged.json()["removed"], serde_json::json!(["W-5_resultados.json"]));
    assert_eq!(purged.json()["rewarmed"][0]["result"], "started");
    // Never the old document: the next click joins the new fetch or hits its entry.
    let click = get(p, &batch("W-5")).await;
    assert_eq!(click.bytes(), &origin.document_version("W-5", 1));
    assert!(stored(&proxy, "W-5_resultados.json").await);
    assert_eq!(origin.generations("W-5"), 2, "one at the first click, one at the re-process");
    assert_eq!(origin.served_versions("W-5"), [0, 1]);

    // By key, too; a purge of everything is not warmed again.
    origin.bump_version("W-5");
    let by_key = admin(
        proxy.admin_addr(),
        Method::POST,
        "/purge",
        Some(TOKEN),
        r#"{"key": "W-5_resultados.json", "rewarm": true}"#,
    )
    .await;
    assert_eq!(by_key.json()["rewarmed"][0]["lote_id"], "W-5");
    assert!(wait_until(Duration::from_secs(5), || origin.generations("W-5") == 3).await);
    let all = admin(proxy.admin_addr(), Method::POST, "/purge", Some(TOKEN), r#"{"all": true, "rewarm": true}"#).await;
    assert_eq!(all.status, StatusCode::BAD_REQUEST);
}

/// A rule with an access check whose fills also carry `x-service-token` from the environment.
fn service_rule(var: &str) -> String {
    format!(
        "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{{lote_id}}\"\n[rules.auth]\nurl = \"/auth/{{lote_id}}\"\n\
         [rules.service_headers]\nx-service-token = \"{var}\"\n"
    )
}

#[tokio::test]
async fn every_fill_sends_the_service_headers_and_a_warm_sends_no_user_credentials() {
    // SAFETY of the test: the variable's name is this test's own.
    std::env::set_var("LOTECACHE_TEST_SERVICE_TOKEN_1", "s3rvice-secret-1");
    let (origin, _dir, proxy) = proxy(&service_rule("LOTECACHE_TEST_SERVICE_TOKEN_1")).await;
    warm(&proxy, r#"{"lote_id": "W-6"}"#).await;
    assert!(stored(&proxy, "W-6_resultados.json").await);
    let mut req = crate::support::request(Method::GET, proxy.local_addr(), &batch("W-7"));
    req.headers_mut().insert("cookie", "user=ok".parse().unwrap());
    assert_eq!(crate::support::send(req).await.status, StatusCode::OK);
    let fills: Vec<_> =
        origin.seen().into_iter().filter(|s| s.target.starts_with("/download_batch_results/")).collect();
    let header = |s: &Seen, name: &str| s.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let warm_fill = fills.iter().find(|s| s.target.ends_with("/W-6")).unwrap();
    assert_eq!(header(warm_fill, "x-service-token").as_deref(), Some("s3rvice-secret-1"));
    assert_eq!(header(warm_fill, "cookie"), None);
    let user_fill = fills.iter().find(|s| s.target.ends_with("/W-7")).unwrap();
    assert_eq!(header(user_fill, "x-service-token").as_deref(), Some("s3rvice-secret-1"));
    assert_eq!(
        header(user_fill, "cookie").as_deref(),
        Some("user=ok"),
        "a user's fill keeps forwarding the user's credentials"
    );
    let checks: Vec<_> = origin.seen().into_iter().filter(|s| s.target.starts_with("/auth/")).collect();
    assert!(checks.iter().all(|c| header(c, "x-service-token").is_none()), "the token is for fills only");
}

#[tokio::test]
async fn the_service_token_is_never_logged_nor_in_an_error() {
    std::env::set_var("LOTECACHE_TEST_SERVICE_TOKEN_2", "s3rvice-secret-2");
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lotecache.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nlevel = \"trace\"\n[admin]\ntoken = \"{TOKEN}\"\n{}",
            service_rule("LOTECACHE_TEST_SERVICE_TOKEN_2")
        ),
    )
    .unwrap();
    let log = dir.path().join("log.txt");
    let cache = dir.path().join("cache");
    let server = crate::support::process::serve_logging(
        origin.addr,
        &cache,
        &["--config", config.to_str().unwrap()],
        Some(&log),
    )
    .await;
    let mut req = crate::support::request(Method::GET, server.addr(), &batch("W-8"));
    req.headers_mut().insert("cookie", "user=ok".parse().unwrap());
    assert_eq!(crate::support::send(req).await.status, StatusCode::OK);
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    let seen = origin.seen();
    assert!(seen.iter().any(|s| s.headers.iter().any(|(k, v)| k == "x-service-token" && v == "s3rvice-secret-2")));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("W-8"), "the log has the request's lines");
    assert!(!text.contains("s3rvice-secret-2"), "the service token reached the log");

    // A variable that is not set: a notice naming the variable (the header is not sent).
    let c = lotecache::config::parse("x", &service_rule("LOTECACHE_TEST_SERVICE_TOKEN_UNSET"), &Default::default())
        .unwrap();
    assert!(c.notices.iter().any(|n| n.contains("LOTECACHE_TEST_SERVICE_TOKEN_UNSET is not set")), "{:?}", c.notices);
    assert!(c.rules[0].headers.service.is_empty());
    let err = lotecache::config::parse(
        "x",
        "[[rules]]\nname = \"b\"\npath = \"/d/{lote_id}\"\n[rules.service_headers]\ncookie = \"LOTECACHE_TEST_SERVICE_TOKEN_2\"\n",
        &Default::default(),
    )
    .unwrap_err();
    let text: Vec<String> = err.iter().map(|e| e.to_string()).collect();
    assert!(text.iter().any(|e| e.contains("credential or forwarded header")), "{text:?}");
    assert!(text.iter().any(|e| e.contains("rules.service_headers: needs an access policy")), "{text:?}");
    assert!(!text.iter().any(|e| e.contains("s3rvice-secret-2")));
}

#[tokio::test]
async fn cache_warm_with_admin_asks_the_server_to_warm_each_listed_batch() {
    let (origin, dir, proxy) = proxy("").await;
    let list = dir.path().join("ids.txt");
    std::fs::write(&list, "# finished today\nW-9\nW-10\nbad!id\n").unwrap();
    let admin_url = format!("http://{}", proxy.admin_addr());
    let run = |token: Option<&'static str>| {
        let (list, admin_url) = (list.clone(), admin_url.clone());
        // The proxy answers on this test's runtime: the command runs off it.
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(crate::support::process::BIN);
            cmd.args(["cache", "warm", "--json", "--admin", &admin_url, list.to_str().unwrap()]);
            match token {
                Some(t) => cmd.env("LOTECACHE_ADMIN_TOKEN", t),
                None => cmd.env_remove("LOTECACHE_ADMIN_TOKEN"),
            };
            cmd.output().unwrap()
        })
    };
    let out = run(Some(TOKEN)).await.unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "one id was refused");
    assert_eq!(report["requested"], 3);
    assert_eq!(report["results"], serde_json::json!({"started": 2, "refused": 1}));
    assert!(report["failed"][0].as_str().unwrap().starts_with("bad!id (batch-results): refused"), "{report}");
    assert!(stored(&proxy, "W-9_resultados.json").await && stored(&proxy, "W-10_resultados.json").await);
    assert_eq!((origin.generations("W-9"), origin.generations("W-10")), (1, 1));

    let out = run(Some("wrong")).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["failed"][0].as_str().unwrap().contains("401"), "{report}");
    let out = run(None).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "no token: refused before asking");
}
