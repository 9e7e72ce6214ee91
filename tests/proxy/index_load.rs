//! The index loads in the background after a restart: the proxy serves at once, and while
//! the load runs (held here with `hold_index_load`, so that every request below happens
//! before the loader has read a single bucket) a stored batch is a hit, a purged one a miss,
//! a never-stored one a miss; a commit or purge made meanwhile is not undone by the load.

use crate::support::{admin, admin_get, batch, get, origin::*, start_proxy_admin};
use http::{Method, StatusCode};
use lotecache::cache::store::hold_index_load;
use std::time::Duration;

const TOKEN: &str = "l0ad-token";

/// A proxy on `dir` in front of `origin`, with an admin token.
async fn proxy_on(origin: &TestOrigin, dir: &std::path::Path) -> lotecache::RunningProxy {
    start_proxy_admin(origin.addr, dir, &format!("token = \"{TOKEN}\""), "").await
}

/// Stores batches `ids` through a proxy on `dir`, then stops it.
async fn stored(origin: &TestOrigin, dir: &std::path::Path, ids: &[&str]) {
    let proxy = proxy_on(origin, dir).await;
    for id in ids {
        let got = get(proxy.local_addr(), &batch(id)).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    proxy.shutdown(Duration::from_secs(1)).await;
}

async fn index_state(proxy: &lotecache::RunningProxy) -> serde_json::Value {
    admin_get(proxy.admin_addr(), "/readyz").await.json()["index"].clone()
}

#[tokio::test]
async fn during_the_index_load_a_stored_batch_is_a_hit_without_generating_it_again() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    stored(&origin, dir.path(), &["IL-1", "IL-2"]).await;

    let hold = hold_index_load(dir.path());
    let proxy = proxy_on(&origin, dir.path()).await;
    let state = index_state(&proxy).await;
    assert_eq!(state["loaded"], false, "{state}");
    assert_eq!(state["entries"], 0, "nothing is loaded while the load is held: {state}");

    let got = get(proxy.local_addr(), &batch("IL-1")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &document("IL-1"));
    assert!(got.cache_status().starts_with("lotecache; hit"), "{}", got.cache_status());
    assert_eq!(origin.generations("IL-1"), 1, "the stored batch was generated again");
    assert_eq!(index_state(&proxy).await["loaded"], false, "the request was served during the load");

    // The collector waits for the whole index: it cannot tell what is live before.
    let gc = admin(proxy.admin_addr(), Method::POST, "/gc", Some(TOKEN), "").await;
    assert_eq!(gc.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(gc.json()["detail"].as_str().unwrap().contains("still loading"), "{}", gc.json());

    drop(hold);
    assert!(
        crate::support::wait_until(Duration::from_secs(10), || proxy.store().is_loaded()).await,
        "the load ends once released"
    );
    let state = index_state(&proxy).await;
    assert_eq!((state["loaded"].clone(), state["entries"].clone()), (true.into(), 2.into()), "{state}");
    let got = get(proxy.local_addr(), &batch("IL-2")).await;
    assert!(got.cache_status().starts_with("lotecache; hit"), "{}", got.cache_status());
    assert_eq!(origin.generations("IL-2"), 1);
}

#[tokio::test]
async fn during_the_index_load_a_never_stored_batch_is_a_miss_and_is_stored() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    stored(&origin, dir.path(), &["IL-3"]).await;

    let hold = hold_index_load(dir.path());
    let proxy = proxy_on(&origin, dir.path()).await;
    let got = get(proxy.local_addr(), &batch("IL-NEW")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &document("IL-NEW"));
    assert!(got.cache_status().contains("fwd=uri-miss"), "{}", got.cache_status());
    let again = get(proxy.local_addr(), &batch("IL-NEW")).await;
    assert!(again.cache_status().starts_with("lotecache; hit"), "{}", again.cache_status());
    assert_eq!(origin.generations("IL-NEW"), 1);

    // The load, released, keeps what was committed meanwhile and adds the rest.
    drop(hold);
    assert!(crate::support::wait_until(Duration::from_secs(10), || proxy.store().is_loaded()).await);
    assert_eq!(proxy.store().len(), 2);
    for id in ["IL-3", "IL-NEW"] {
        let got = get(proxy.local_addr(), &batch(id)).await;
        assert!(got.cache_status().starts_with("lotecache; hit"), "{id}: {}", got.cache_status());
        assert_eq!(origin.generations(id), 1, "{id}");
    }
}

#[tokio::test]
async fn a_purge_during_the_index_load_covers_entries_the_load_has_not_reached() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    stored(&origin, dir.path(), &["IL-4", "IL-5", "IL-6"]).await;

    // Both batches are processed again: their stored documents are old from here on.
    let new = ["IL-4", "IL-5"].map(|id| (id, origin.bump_version(id)));
    let hold = hold_index_load(dir.path());
    let proxy = proxy_on(&origin, dir.path()).await;
    // By key: the key is read from its bucket and removed at once.
    let by_key = admin(proxy.admin_addr(), Method::DELETE, "/entries/IL-5_resultados.json", Some(TOKEN), "").await;
    assert_eq!(by_key.json()["removed"], serde_json::json!(["IL-5_resultados.json"]));
    // By batch: the rules' key for the batch is brought into memory and removed at once; the
    // load removes what else it reaches that the purge covers.
    let purged = admin(proxy.admin_addr(), Method::POST, "/purge", Some(TOKEN), r#"{"lote_id":"IL-4"}"#).await;
    assert_eq!(purged.json()["removed"], serde_json::json!(["IL-4_resultados.json"]));
    assert_eq!(purged.json()["index_loading"], true);

    // Both are misses now, during the load: the origin generates the new documents.
    for (id, version) in new {
        let got = get(proxy.local_addr(), &batch(id)).await;
        assert_eq!(got.bytes(), &origin.document_version(id, version));
        assert!(got.cache_status().contains("fwd=uri-miss"), "{id}: {}", got.cache_status());
        assert_eq!(origin.generations(id), 2, "{id}");
    }
    let got = get(proxy.local_addr(), &batch("IL-6")).await;
    assert!(got.cache_status().starts_with("lotecache; hit"), "{}", got.cache_status());

    drop(hold);
    assert!(crate::support::wait_until(Duration::from_secs(10), || proxy.store().is_loaded()).await);
    // The copies stored after the purges stay, and so does the entry no purge covers.
    for id in ["IL-4", "IL-5", "IL-6"] {
        assert!(proxy.store().holds("batch-results", &format!("{id}_resultados.json")), "{id}");
    }
    proxy.shutdown(Duration::from_secs(1)).await;

    // The purges are on disk: a restart serves the new documents, never the old ones.
    let proxy = proxy_on(&origin, dir.path()).await;
    for (id, version) in new {
        let got = get(proxy.local_addr(), &batch(id)).await;
        assert!(got.cache_status().starts_with("lotecache; hit"), "{id}: {}", got.cache_status());
        assert_eq!(got.bytes(), &origin.document_version(id, version), "{id}: the old document came back");
    }
    assert_eq!((origin.generations("IL-4"), origin.generations("IL-5"), origin.generations("IL-6")), (2, 2, 1));
}

#[tokio::test]
async fn an_index_file_that_cannot_be_read_answers_503_and_never_generates_the_batch_again() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    stored(&origin, dir.path(), &["IL-7"]).await;
    let proxy = proxy_on(&origin, dir.path()).await;
    assert!(crate::support::wait_until(Duration::from_secs(10), || proxy.store().is_loaded()).await);
    // Loaded, not yet served (so not built in memory); then its bucket becomes unreadable.
    let bucket = lotecache::cache::store::bucket_path(dir.path(), "IL-7_resultados.json");
    std::fs::remove_file(&bucket).unwrap();
    std::fs::create_dir(&bucket).unwrap();
    let got = get(proxy.local_addr(), &batch("IL-7")).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.json()["error"], "cache store temporarily unreadable", "{}", got.json());
    assert!(got.json()["detail"].as_str().unwrap().contains("index could not be read"), "{}", got.json());
    assert_eq!(origin.generations("IL-7"), 1, "a stored batch was generated again on a guess");
}
