//! What the operator sees: the cache page on the admin port (one self-contained document),
//! `GET /stats` (the mission's figures: generations avoided, origin time and bytes saved), the
//! entries sorted, searched and paginated on the server, and the shipped Grafana dashboard and
//! Prometheus alert rules querying only metrics that a live `/metrics` has.

use crate::support::origin::*;
use crate::support::{admin_get, batch, get, setup};
use http::StatusCode;

#[tokio::test]
async fn the_cache_page_is_one_self_contained_document_confined_by_its_policy() {
    let (_origin, _dir, proxy) = setup("").await;
    let page = admin_get(proxy.admin_addr(), "/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    let html = String::from_utf8(page.bytes().to_vec()).unwrap();
    assert!(html.contains("<title>lotecache — cache</title>"));
    for external in ["http://", "https://", "src=\"//", "href=\"//", "@import"] {
        assert!(!html.contains(external), "the page loads something from elsewhere: {external}");
    }
    // Rendered as text, never as markup; the token never leaves the page's memory.
    assert!(!html.contains("innerHTML") && !html.contains("localStorage") && !html.contains("sessionStorage"));
    assert!(!html.contains("document.cookie"));
}

#[tokio::test]
async fn stats_give_the_generations_avoided_the_time_and_bytes_saved_and_per_rule_figures() {
    let (origin, _dir, proxy) = setup("").await;
    let p = proxy.local_addr();
    origin.set("S-1", Behavior::Delayed(std::time::Duration::from_millis(200), Box::new(Behavior::Chunked)));
    get(p, &batch("S-1")).await; // a miss of about 200 ms
    get(p, &batch("S-1")).await;
    get(p, &batch("S-1")).await;
    let stats = admin_get(proxy.admin_addr(), "/stats").await.json();
    assert_eq!(stats["requests"]["hit"], 2);
    assert_eq!(stats["requests"]["miss"], 1);
    assert!((stats["hit_ratio"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9, "{stats}");
    assert_eq!(stats["generations_avoided"], 2);
    let doc = document("S-1").len() as u64;
    assert_eq!(stats["origin_bytes_saved"], 2 * doc);
    let saved = stats["origin_seconds_saved"].as_f64().unwrap();
    assert!((0.4..2.0).contains(&saved), "two hits of a ~200 ms generation saved {saved} s");
    assert_eq!(stats["store"]["entries"], 1);
    assert_eq!(stats["fills_in_flight"], 0);
    assert!(stats["store"]["free_disk"].as_u64().unwrap() > 0);
    assert_eq!(stats["shared_store"], serde_json::Value::Null);
    let rule = &stats["rules"][0];
    assert_eq!(
        (rule["rule"].as_str(), rule["entries"].as_u64(), rule["hits"].as_u64()),
        (Some("batch-results"), Some(1), Some(2))
    );
    assert_eq!(rule["bytes"], doc);
    let metrics = proxy.store().metrics().render();
    assert!(metrics.contains(&format!("lotecache_origin_bytes_saved_total {}", 2 * doc)), "{metrics}");
}

#[tokio::test]
async fn entries_are_sorted_searched_and_paginated_on_the_server() {
    let (_origin, _dir, proxy) = setup("").await;
    let p = proxy.local_addr();
    // E-3 gets 3 hits, E-1 one, E-2 none; sizes 8 KB, 4 KB, 16 KB.
    for (id, hits) in [("E-1-8kb", 1), ("E-2-4kb", 0), ("E-3-16kb", 3), ("other-2kb", 0)] {
        for _ in 0..=hits {
            get(p, &batch(id)).await;
        }
    }
    let list = |q: &str| {
        let a = proxy.admin_addr();
        let q = q.to_string();
        async move { admin_get(a, &format!("/entries?{q}")).await }
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["entries"].as_array().unwrap().iter().map(|e| e["lote_id"].as_str().unwrap().to_string()).collect()
    };
    let by_hits = list("sort=hits&order=desc").await.json();
    assert_eq!(ids(&by_hits)[..2], ["E-3-16kb", "E-1-8kb"]);
    assert_eq!(by_hits["entries"][0]["hits"], 3);
    assert_eq!(ids(&list("sort=size&order=asc").await.json()), ["other-2kb", "E-2-4kb", "E-1-8kb", "E-3-16kb"]);
    let found = list("q=e-&sort=lote_id").await.json();
    assert_eq!(
        (found["total"].as_u64(), ids(&found)),
        (Some(3), vec!["E-1-8kb".into(), "E-2-4kb".into(), "E-3-16kb".into()])
    );
    let page2 = list("q=E-&sort=lote_id&offset=2&limit=2").await.json();
    assert_eq!((page2["total"].as_u64(), ids(&page2)), (Some(3), vec!["E-3-16kb".to_string()]));
    assert_eq!(list("q=nothing-like-it").await.json()["total"], 0);
    for bad in ["sort=evil", "order=sideways"] {
        let got = list(bad).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(got.json()["error"], "bad list request");
    }
}

/// The metric names a PromQL expression uses (histogram series reduced to their metric).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("lotecache_") {
        let start = i + at;
        let end = start + bytes[start..].iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'_').count();
        let name = &expr[start..end];
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        out.push(base.to_string());
        i = end;
    }
    out
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alert_rules_query_is_in_a_live_metrics_output() {
    let (_origin, _dir, proxy) = setup("").await;
    let live = String::from_utf8(admin_get(proxy.admin_addr(), "/metrics").await.bytes().to_vec()).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/deploy/grafana/lotecache.json")).unwrap())
            .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    let panels = dashboard["panels"].as_array().unwrap().len();
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap();
    // Each rule's `expr:` block (up to the rule's next key), not its descriptions.
    let mut in_expr = false;
    for line in alerts.lines() {
        let t = line.trim_start();
        if t.starts_with("expr:") {
            in_expr = true;
        } else if ["for:", "labels:", "annotations:", "- alert:"].iter().any(|k| t.starts_with(k)) {
            in_expr = false;
        }
        if in_expr {
            exprs.push(line.to_string());
        }
    }
    let mut names: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 15, "{names:?}");
    let missing: Vec<&String> =
        names.iter().filter(|n| !live.lines().any(|l| l.starts_with(&format!("# TYPE {n} ")))).collect();
    assert!(missing.is_empty(), "queried but absent from a fresh /metrics: {missing:?}");
    for title in [
        "Hit ratio",
        "Requests by outcome",
        "Origin time saved",
        "Store bytes vs cap",
        "Fills in flight",
        "Integrity failures",
        "Shared store",
        "Access-check latency",
    ] {
        assert!(
            dashboard["panels"].as_array().unwrap().iter().any(|p| p["title"] == title),
            "no {title} panel of {panels}"
        );
    }
    for alert in [
        "LotecacheIntegrityFailure",
        "LotecacheSharedStoreDown",
        "LotecacheStoreNearCap",
        "LotecacheFillsStuck",
        "LotecacheOriginErrors",
        "LotecacheNoHits",
    ] {
        assert!(alerts.contains(&format!("alert: {alert}")), "no {alert} rule");
    }
}
