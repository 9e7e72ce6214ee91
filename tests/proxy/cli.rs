//! The `lotecache` binary: `check-config`, and `serve` with flags in front of an origin.

use crate::support::process::{serve, BIN};
use crate::support::{batch, get, origin::*};
use std::process::Command;

#[test]
fn check_config_accepts_the_shipped_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/lotecache.toml");
    let out =
        Command::new(BIN).args(["check-config", path]).env("LOTECACHE_SERVICE_TOKEN", "a-token").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    // Without the service token's variable: still valid, with a warning naming it.
    let out = Command::new(BIN).args(["check-config", path]).env_remove("LOTECACHE_SERVICE_TOKEN").output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(said.contains("warning: ") && said.contains("LOTECACHE_SERVICE_TOKEN is not set"), "{said}");
    assert!(said.trim_end().ends_with("ok"), "{said}");
}

#[test]
fn check_config_prints_every_error_with_its_location_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = \"x\"\n[origin]\nurl = \"ftp://o\"\n").unwrap();
    let out = Command::new(BIN).args(["check-config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2:10: server.listen:"), "{err}");
    assert!(err.contains("bad.toml:4:7: origin.url:"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
}

#[tokio::test]
async fn serve_with_flags_shows_one_generation_a_hit_and_a_hit_after_restart() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = serve(origin.addr, dir.path(), &[]).await;
    let addr = server.addr();
    let first = get(addr, &batch("S-1")).await;
    let second = get(addr, &batch("S-1")).await;
    assert_eq!(second.cache_status(), "lotecache; hit");
    assert_eq!(first.bytes(), second.bytes());
    assert_eq!(origin.generations("S-1"), 1);
    drop(server);

    let server = serve(origin.addr, dir.path(), &[]).await;
    let third = get(server.addr(), &batch("S-1")).await;
    assert_eq!(third.cache_status(), "lotecache; hit");
    assert_eq!(third.bytes(), first.bytes());
    assert_eq!(origin.generations("S-1"), 1);
}

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/lotecache.toml");

/// `lotecache cache import --json` of `from` into `cache` with the shipped config: exit code,
/// report, stderr.
fn import(cache: &std::path::Path, from: &std::path::Path) -> (Option<i32>, serde_json::Value, String) {
    let out = Command::new(BIN)
        .args(["cache", "import", "--json", "--config", SHIPPED, "--cache-dir", cache.to_str().unwrap()])
        .arg(from)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), report, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn files(report: &serde_json::Value, list: &str) -> Vec<String> {
    report[list].as_array().unwrap().iter().map(|f| f.as_str().map_or(f["file"].to_string(), String::from)).collect()
}

#[tokio::test]
async fn saved_documents_are_imported_validated_once_and_then_served_as_hits() {
    let origin = TestOrigin::start().await;
    let saved = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let put = |name: &str, bytes: &[u8]| std::fs::write(saved.path().join(name), bytes).unwrap();
    put("IMP-1_resultados.json", &document("IMP-1"));
    put("IMP-2-2mb_resultados.json", &document("IMP-2-2mb"));
    put("IMP-3_resultados.json", &document("IMP-9")); // another batch's document
    put("IMP-4_resultados.json", b"{\"metadata\": {\"lote_id\": \"IMP-4\""); // cut JSON
    put("bad id!_resultados.json", &document("IMP-1"));
    put("README.txt", b"not a batch");

    let (code, report, stderr) = import(cache.path(), saved.path());
    assert_eq!(code, Some(1), "a file failed: exit 1 ({stderr})");
    assert_eq!(files(&report, "imported"), ["IMP-1_resultados.json", "IMP-2-2mb_resultados.json"]);
    let failed = files(&report, "failed");
    assert_eq!(failed.len(), 3, "{report}");
    for name in ["IMP-3_resultados.json", "IMP-4_resultados.json", "bad id!_resultados.json"] {
        assert!(failed.iter().any(|f| f.contains(name)), "{name} failed: {report}");
    }
    assert!(files(&report, "skipped")[0].contains("README.txt"), "{report}");

    // Again: nothing stored twice.
    let (code, report, _) = import(cache.path(), saved.path());
    assert_eq!(code, Some(1));
    assert!(files(&report, "imported").is_empty(), "{report}");
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.iter().filter(|s| s["reason"].as_str().unwrap().starts_with("already stored")).count(), 2);

    // Served as hits, with the head a fill stores; the origin generates nothing.
    let server = serve(origin.addr, cache.path(), &["--config", SHIPPED]).await;
    for id in ["IMP-1", "IMP-2-2mb"] {
        let mut req = crate::support::request(http::Method::GET, server.addr(), &batch(id));
        req.headers_mut().insert("cookie", "session=x".parse().unwrap()); // the shipped rule's access check allows it
        let got = crate::support::send(req).await;
        assert_eq!(got.cache_status(), "lotecache; hit", "{id}");
        assert_eq!(got.bytes(), &document(id));
        assert_eq!(got.headers["content-disposition"], format!("attachment; filename={id}_resultados.json"));
        assert_eq!(got.headers["content-type"], "application/json");
        assert_eq!(got.headers["vary"], "Cookie", "no fill to copy from: the legacy backend's head");
        assert_eq!(origin.generations(id), 0);
    }

    // A running server's store is refused.
    let (code, _, stderr) = import(cache.path(), saved.path());
    assert_eq!(code, Some(2));
    assert!(stderr.contains("in use by another lotecache process"), "{stderr}");
    drop(server);

    // export and import round-trip: the same keys and bytes in a fresh store.
    let exported = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["cache", "export", "--cache-dir", cache.path().to_str().unwrap()])
        .arg(exported.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fresh = tempfile::tempdir().unwrap();
    let (code, report, stderr) = import(fresh.path(), exported.path());
    assert_eq!(code, Some(0), "{stderr} {report}");
    assert_eq!(files(&report, "imported"), ["IMP-1_resultados.json", "IMP-2-2mb_resultados.json"]);
    let sums = |dir: &std::path::Path| {
        let mut v: Vec<(String, String)> =
            lotecache::cachectl::ls(dir).iter().map(|e| (e.key.clone(), hex::encode(e.sha256))).collect();
        v.sort();
        v
    };
    assert_eq!(sums(fresh.path()), sums(cache.path()));
}

#[tokio::test]
async fn an_imported_entry_is_served_with_the_head_a_fill_of_its_rule_stored() {
    let origin = TestOrigin::start().await;
    let head = vec![("vary".to_string(), "Cookie".to_string()), ("x-generated-by".to_string(), "ocr".to_string())];
    origin.set("HF-1", Behavior::WithHeaders(head));
    let cache = tempfile::tempdir().unwrap();
    let hit = |addr, id: &'static str| async move {
        let mut req = crate::support::request(http::Method::GET, addr, &batch(id));
        req.headers_mut().insert("cookie", "session=x".parse().unwrap());
        crate::support::send(req).await
    };
    let server = serve(origin.addr, cache.path(), &["--config", SHIPPED]).await;
    hit(server.addr(), "HF-1").await;
    let filled = hit(server.addr(), "HF-1").await;
    assert_eq!(filled.cache_status(), "lotecache; hit; access=cached");
    drop(server);

    let saved = tempfile::tempdir().unwrap();
    std::fs::write(saved.path().join("HF-2_resultados.json"), document("HF-2")).unwrap();
    let (code, report, stderr) = import(cache.path(), saved.path());
    assert_eq!(code, Some(0), "{stderr} {report}");
    assert_eq!(report["head_from"], "HF-1_resultados.json");

    let server = serve(origin.addr, cache.path(), &["--config", SHIPPED]).await;
    let imported = hit(server.addr(), "HF-2").await;
    assert_eq!(imported.cache_status(), "lotecache; hit");
    let comparable = |got: &crate::support::Got| {
        let mut h = got.headers.clone();
        // Whether the access decision was kept is not the entry's head.
        h.remove("cache-status");
        for per_answer in ["content-disposition", "content-length", "etag", "repr-digest", "age", "date"] {
            h.remove(per_answer);
        }
        let mut v: Vec<(String, String)> =
            h.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string())).collect();
        v.sort();
        v
    };
    assert_eq!(comparable(&imported), comparable(&filled));
    assert_eq!(imported.headers["content-disposition"], "attachment; filename=HF-2_resultados.json");
    assert_eq!(imported.headers["x-generated-by"], "ocr");
    assert_eq!(origin.generations("HF-2"), 0);
}

#[test]
fn import_keeps_to_the_rules_size_limit_and_never_replaces_another_stored_document() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lotecache.toml");
    let shipped = std::fs::read_to_string(SHIPPED).unwrap();
    let limited =
        shipped.replacen("name = \"batch-results\"\n", "name = \"batch-results\"\nmax_object_size = \"8KiB\"\n", 1);
    assert_ne!(limited, shipped);
    std::fs::write(&config, limited).unwrap();
    let (cache, saved) = (dir.path().join("cache"), dir.path().join("saved"));
    std::fs::create_dir(&saved).unwrap();
    std::fs::write(saved.join("IMP-5_resultados.json"), document("IMP-5")).unwrap();
    std::fs::write(saved.join("IMP-6-16kb_resultados.json"), document("IMP-6-16kb")).unwrap();
    let run = || {
        let out = Command::new(BIN)
            .args(["cache", "import", "--json", "--config", config.to_str().unwrap(), "--cache-dir"])
            .args([cache.to_str().unwrap(), saved.to_str().unwrap()])
            .output()
            .unwrap();
        (out.status.code(), serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    };
    let (code, report) = run();
    assert_eq!(code, Some(1));
    assert_eq!(files(&report, "imported"), ["IMP-5_resultados.json"]);
    assert!(report["failed"][0]["reason"].as_str().unwrap().contains("larger than"), "{report}");

    // The batch re-processed since: the stored document stays until it is purged.
    std::fs::write(saved.join("IMP-5_resultados.json"), versioned_document("IMP-5", 2)).unwrap();
    let (_, report) = run();
    assert!(files(&report, "imported").is_empty());
    assert!(report["skipped"][0]["reason"].as_str().unwrap().starts_with("another document is stored"), "{report}");
    let stored = lotecache::cachectl::ls(&cache);
    assert_eq!(stored.len(), 1);
    use sha2::Digest as _;
    assert_eq!(stored[0].sha256[..], sha2::Sha256::digest(document("IMP-5"))[..]);
}

#[test]
fn import_refuses_a_rule_that_cannot_tie_a_document_to_its_id() {
    let saved = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["cache", "import", "--cache-dir", cache.path().to_str().unwrap()])
        .arg(saved.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no assertion tying a document to its id"));
}
