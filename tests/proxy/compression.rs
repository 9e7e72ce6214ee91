//! Precompressed representations: after a batch is stored, brotli and gzip variants are built
//! off the request path, each its own verified content file; `Accept-Encoding` (q-values,
//! `identity`, `*`) picks one per request, never keying the store on the raw header. Every
//! answer of the route says `Vary: Accept-Encoding`; each representation has its own strong
//! `ETag`, `Content-Length` and `Repr-Digest`, and conditions and ranges apply to the one
//! selected.

use crate::support::origin::*;
use crate::support::{admin, admin_get, batch, get, metric, request, send, setup, start_proxy_admin, Got};
use bytes::Bytes;
use http::{Method, StatusCode};
use sha2::Digest;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// GET `id` with these extra request headers.
async fn get_with(proxy: SocketAddr, id: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = request(Method::GET, proxy, &batch(id));
    for (name, value) in headers {
        req.headers_mut().append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    }
    send(req).await
}

/// What a browser sends.
const BROWSER: &str = "gzip, deflate, br, zstd";

fn decode(coding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "br" => brotli::Decompressor::new(bytes, 4096).read_to_end(&mut out).unwrap(),
        "gzip" => flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap(),
        other => panic!("unexpected coding {other}"),
    };
    out
}

fn sha256_b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
}

fn vary_lists_accept_encoding(got: &Got) -> bool {
    got.headers
        .get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding"))
}

/// Stores `id` and waits (bounded) until both variants are built.
async fn stored_with_variants(proxy: &lotecache::RunningProxy, id: &str) {
    let miss = get(proxy.local_addr(), &batch(id)).await;
    assert_eq!(miss.status, StatusCode::OK);
    assert!(wait_for_variants(proxy, id, 2).await, "variants of {id} were not built within 20 s");
}

async fn wait_for_variants(proxy: &lotecache::RunningProxy, id: &str, n: usize) -> bool {
    for _ in 0..400 {
        let entry = admin_get(proxy.admin_addr(), &format!("/entries/{id}_resultados.json")).await;
        if entry.status == StatusCode::OK && entry.json()["variants"].as_array().map_or(0, |v| v.len()) == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The content file of the `coding` variant of `id` in the cache at `dir`.
async fn variant_file(proxy: &lotecache::RunningProxy, dir: &Path, id: &str, coding: &str) -> PathBuf {
    let entry = admin_get(proxy.admin_addr(), &format!("/entries/{id}_resultados.json")).await.json();
    let v = entry["variants"].as_array().unwrap().iter().find(|v| v["encoding"] == coding).expect("variant listed");
    let hex = v["sha256"].as_str().unwrap();
    dir.join("content-v2/sha256").join(&hex[0..2]).join(&hex[2..4]).join(&hex[4..])
}

#[tokio::test]
async fn each_client_gets_the_representation_it_accepts_and_every_one_decodes_to_the_document() {
    let (origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    let doc = document("C-1-256kb");
    let miss = get_with(addr, "C-1-256kb", &[("accept-encoding", BROWSER)]).await;
    assert_eq!(miss.status, StatusCode::OK);
    assert!(miss.headers.get("content-encoding").is_none(), "a miss is served identity");
    assert_eq!(miss.bytes(), &doc);
    assert!(wait_for_variants(&proxy, "C-1-256kb", 2).await);

    let identity = get(addr, &batch("C-1-256kb")).await;
    assert_eq!(identity.cache_status(), "lotecache; hit");
    assert!(identity.headers.get("content-encoding").is_none(), "no Accept-Encoding: identity");
    assert_eq!(identity.bytes(), &doc);

    let mut etags = vec![identity.headers["etag"].clone()];
    for (accept, coding) in [(BROWSER, "br"), ("gzip", "gzip"), ("x-gzip", "gzip"), ("br;q=0.5, gzip;q=0.9", "gzip")] {
        let got = get_with(addr, "C-1-256kb", &[("accept-encoding", accept)]).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.cache_status(), "lotecache; hit");
        assert_eq!(got.headers["content-encoding"], coding, "Accept-Encoding {accept:?}");
        let body = got.bytes();
        assert!(body.len() * 3 < doc.len(), "{coding} is {} bytes for {} of JSON", body.len(), doc.len());
        assert_eq!(got.headers["content-length"], body.len().to_string());
        assert_eq!(
            got.headers["repr-digest"],
            format!("sha-256=:{}:", sha256_b64(body)),
            "Repr-Digest of the bytes sent"
        );
        assert_eq!(got.headers["etag"], format!("\"sha256-{}\"", hex::encode(sha2::Sha256::digest(body))));
        assert!(vary_lists_accept_encoding(&got));
        assert_eq!(decode(coding, body), doc, "the {coding} variant decodes to the document");
        if !etags.contains(&got.headers["etag"]) {
            etags.push(got.headers["etag"].clone());
        }
    }
    assert_eq!(etags.len(), 3, "identity, br and gzip each have their own ETag");
    for (accept, coding) in [
        ("identity", None),
        // Nothing listed is stored (identity refused, no coding named): identity all the same.
        ("identity;q=0", None),
        ("identity;q=0, gzip;q=0.1", Some("gzip")),
        ("*", Some("br")),
        ("*;q=0.5, br;q=0", Some("gzip")),
        ("compress, zstd", None),
        ("br;q=0, gzip;q=0", None),
        ("gzip, identity;q=1, br;q=0.2", Some("gzip")),
        ("", None),
    ] {
        let got = get_with(addr, "C-1-256kb", &[("accept-encoding", accept)]).await;
        assert_eq!(
            got.headers.get("content-encoding").map(|v| v.to_str().unwrap()),
            coding,
            "Accept-Encoding {accept:?}"
        );
        let sent = got.bytes();
        assert_eq!(coding.map_or(sent.to_vec(), |c| decode(c, sent)), doc);
    }
    // Two lines are one list.
    let got = get_with(addr, "C-1-256kb", &[("accept-encoding", "br;q=0.1"), ("accept-encoding", "gzip")]).await;
    assert_eq!(got.headers["content-encoding"], "gzip");
    assert_eq!(origin.generations("C-1-256kb"), 1);
    let metrics = admin_get(proxy.admin_addr(), "/metrics").await;
    let text = String::from_utf8_lossy(metrics.bytes()).to_string();
    assert_eq!(metric(&text, "lotecache_variants_built_total{encoding=\"br\"}"), Some(1.0));
    assert_eq!(metric(&text, "lotecache_variants_built_total{encoding=\"gzip\"}"), Some(1.0));
    assert_eq!(metric(&text, "lotecache_hit_encodings_total{encoding=\"br\"}"), Some(2.0));
    assert_eq!(metric(&text, "lotecache_hit_encodings_total{encoding=\"gzip\"}"), Some(7.0));
}

#[tokio::test]
async fn every_answer_of_the_route_varies_on_accept_encoding() {
    let (origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    origin.set("C-2-err", Behavior::Status(500));
    let answers = [
        get_with(addr, "C-2-64kb", &[("accept-encoding", BROWSER)]).await, // miss
        get_with(addr, "C-2-64kb", &[]).await,                             // identity hit
        get_with(addr, "C-2-64kb", &[("range", "bytes=0-9")]).await,       // 206
        get_with(addr, "C-2-64kb", &[("range", "bytes=999999-")]).await,   // 416
        get_with(addr, "C-2-64kb", &[("if-match", "\"nope\"")]).await,     // 412
        get_with(addr, "C-2-err", &[]).await,                              // origin failure
        send(request(Method::HEAD, addr, &batch("C-2-64kb"))).await,
    ];
    let mut answers = Vec::from(answers);
    answers.push(get(addr, &batch("bad%21id")).await); // an id the rule refuses
    answers.push(get(addr, "/download_batch_results/C-2?x=1").await); // a query it refuses
    let statuses: Vec<u16> = answers.iter().map(|g| g.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 206, 416, 412, 500, 200, 400, 400]);
    for (i, got) in answers.iter().enumerate() {
        assert!(vary_lists_accept_encoding(got), "answer {i} ({}) lacks Vary: Accept-Encoding", got.status);
    }
    assert!(wait_for_variants(&proxy, "C-2-64kb", 2).await);
    let br = get_with(addr, "C-2-64kb", &[("accept-encoding", "br")]).await;
    let not_modified = get_with(
        addr,
        "C-2-64kb",
        &[("accept-encoding", "br"), ("if-none-match", br.headers["etag"].to_str().unwrap())],
    )
    .await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(vary_lists_accept_encoding(&not_modified), "a 304 carries the Vary its 200 would");
}

#[tokio::test]
async fn if_none_match_compares_against_the_selected_representations_etag() {
    let (origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    stored_with_variants(&proxy, "C-3-64kb").await;
    let identity = get(addr, &batch("C-3-64kb")).await;
    let br = get_with(addr, "C-3-64kb", &[("accept-encoding", "br")]).await;
    let (id_tag, br_tag) = (identity.headers["etag"].to_str().unwrap(), br.headers["etag"].to_str().unwrap());
    assert_ne!(id_tag, br_tag);

    let got = get_with(addr, "C-3-64kb", &[("accept-encoding", "br"), ("if-none-match", br_tag)]).await;
    assert_eq!(got.status, StatusCode::NOT_MODIFIED);
    assert_eq!(got.headers["etag"], br_tag);
    assert_eq!(got.headers["content-encoding"], "br");
    assert!(got.bytes().is_empty());

    // The client's copy is identity, but br is selected now: the whole br answer.
    let got = get_with(addr, "C-3-64kb", &[("accept-encoding", "br"), ("if-none-match", id_tag)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["content-encoding"], "br");
    assert_eq!(got.bytes(), br.bytes());

    // A br tag from a client that now takes only identity: the whole identity answer.
    let got = get_with(addr, "C-3-64kb", &[("if-none-match", br_tag)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.headers.get("content-encoding").is_none());
    assert_eq!(got.bytes(), &document("C-3-64kb"));

    let got = get_with(addr, "C-3-64kb", &[("if-none-match", id_tag)]).await;
    assert_eq!(got.status, StatusCode::NOT_MODIFIED);
    assert_eq!(origin.generations("C-3-64kb"), 1);
}

#[tokio::test]
async fn a_range_applies_to_the_selected_representation() {
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    // 2 MB: the br variant is sent from its file too.
    stored_with_variants(&proxy, "C-4-2mb").await;
    let whole = get_with(addr, "C-4-2mb", &[("accept-encoding", "br")]).await;
    let br = whole.bytes().clone();
    let n = br.len();
    for (range, start, end) in [
        ("bytes=0-99".to_string(), 0, 99),
        (format!("bytes={}-{}", n / 3, n / 2), n / 3, n / 2),
        ("bytes=-100".to_string(), n - 100, n - 1),
    ] {
        let got = get_with(addr, "C-4-2mb", &[("accept-encoding", "br"), ("range", &range)]).await;
        assert_eq!(got.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(got.headers["content-encoding"], "br");
        assert_eq!(got.headers["content-range"], format!("bytes {start}-{end}/{n}"));
        assert_eq!(got.headers["etag"], whole.headers["etag"]);
        assert_eq!(got.bytes()[..], br[start..=end]);
    }
    // Resuming a br download with its own ETag gets the rest of the br bytes; with the
    // identity ETag (another representation) the whole br answer.
    let resumed = get_with(
        addr,
        "C-4-2mb",
        &[
            ("accept-encoding", "br"),
            ("range", &format!("bytes={}-", n / 2)),
            ("if-range", whole.headers["etag"].to_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(resumed.status, StatusCode::PARTIAL_CONTENT);
    let mut joined = br[..n / 2].to_vec();
    joined.extend_from_slice(resumed.bytes());
    assert_eq!(decode("br", &joined), document("C-4-2mb"));
    let identity_tag = get(addr, &batch("C-4-2mb")).await.headers["etag"].clone();
    let other = get_with(
        addr,
        "C-4-2mb",
        &[("accept-encoding", "br"), ("range", "bytes=10-20"), ("if-range", identity_tag.to_str().unwrap())],
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.bytes(), &br);
    let unsatisfiable =
        get_with(addr, "C-4-2mb", &[("accept-encoding", "br"), ("range", &format!("bytes={n}-"))]).await;
    assert_eq!(unsatisfiable.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(unsatisfiable.headers["content-range"], format!("bytes */{n}"));
}

#[tokio::test]
async fn a_corrupted_variant_is_never_served_and_is_built_again() {
    // No memory tier: every hit reads the file, so the damage is seen at once.
    let (origin, dir, proxy) = setup("memory_tier = \"0\"\n").await;
    let addr = proxy.local_addr();
    let doc = document("C-5-256kb");
    stored_with_variants(&proxy, "C-5-256kb").await;
    let br = get_with(addr, "C-5-256kb", &[("accept-encoding", "br")]).await;
    let path = variant_file(&proxy, dir.path(), "C-5-256kb", "br").await;
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();

    let got = get_with(addr, "C-5-256kb", &[("accept-encoding", "br")]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.headers.get("content-encoding").is_none(), "the damaged br file was served");
    assert_eq!(got.bytes(), &doc, "the identity body stands in");
    let metrics = String::from_utf8_lossy(admin_get(proxy.admin_addr(), "/metrics").await.bytes()).to_string();
    assert_eq!(metric(&metrics, "lotecache_integrity_failures_total{reason=\"digest-mismatch\"}"), Some(1.0));

    // Built again from the verified body, and served once it proved itself.
    let mut rebuilt = None;
    for _ in 0..200 {
        let got = get_with(addr, "C-5-256kb", &[("accept-encoding", "br")]).await;
        if got.headers.get("content-encoding").is_some() {
            rebuilt = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rebuilt = rebuilt.expect("the br variant was built again");
    assert_eq!(rebuilt.bytes(), br.bytes(), "the same bytes as before the damage");
    assert_eq!(decode("br", rebuilt.bytes()), doc);
    assert_eq!(origin.generations("C-5-256kb"), 1, "a bad variant never costs a generation");
}

#[tokio::test]
async fn a_purge_removes_the_variants_with_the_entry_and_gc_deletes_their_files() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy_admin(origin.addr, dir.path(), "token = \"t\"", "gc_grace = \"1ms\"\n").await;
    let addr = proxy.local_addr();
    stored_with_variants(&proxy, "C-6-64kb").await;
    let files = [
        variant_file(&proxy, dir.path(), "C-6-64kb", "br").await,
        variant_file(&proxy, dir.path(), "C-6-64kb", "gzip").await,
    ];
    assert!(files.iter().all(|f| f.exists()));
    let purged = admin(proxy.admin_addr(), Method::POST, "/purge", Some("t"), r#"{"lote_id": "C-6-64kb"}"#).await;
    assert_eq!(purged.status, StatusCode::OK);
    let gc = admin(proxy.admin_addr(), Method::POST, "/gc", Some("t"), "").await;
    assert_eq!(gc.status, StatusCode::OK);
    for f in &files {
        assert!(!f.exists(), "{} outlived its purged entry's collection", f.display());
    }
    let after = get_with(addr, "C-6-64kb", &[("accept-encoding", BROWSER)]).await;
    assert!(after.cache_status().starts_with("lotecache; fwd=uri-miss"), "{}", after.cache_status());
    assert!(after.headers.get("content-encoding").is_none());
    assert_eq!(origin.generations("C-6-64kb"), 2);
}

#[tokio::test]
async fn no_transform_from_the_origin_means_no_variants() {
    let (origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    origin.set("C-7-64kb", Behavior::WithHeaders(vec![("Cache-Control".into(), "public, no-transform".into())]));
    get(addr, &batch("C-7-64kb")).await;
    for _ in 0..5 {
        let got = get_with(addr, "C-7-64kb", &[("accept-encoding", BROWSER)]).await;
        assert_eq!(got.cache_status(), "lotecache; hit");
        assert!(got.headers.get("content-encoding").is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let entry = admin_get(proxy.admin_addr(), "/entries/C-7-64kb_resultados.json").await.json();
    assert_eq!(entry["variants"], serde_json::json!([]));
}

#[tokio::test]
async fn a_variant_not_smaller_by_the_margin_is_not_kept() {
    let (origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    // Bytes that do not compress.
    let mut noise = vec![0u8; 64 * 1024];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let noise = Bytes::from(noise);
    origin.set("C-8", Behavior::Custom(noise.clone()));
    get(addr, &batch("C-8")).await;
    let mut seen = None;
    for _ in 0..200 {
        let text = String::from_utf8_lossy(admin_get(proxy.admin_addr(), "/metrics").await.bytes()).to_string();
        seen = metric(&text, "lotecache_variants_not_kept_total{reason=\"not-smaller\"}");
        if seen == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, Some(2.0), "both variants were judged and dropped");
    let got = get_with(addr, "C-8", &[("accept-encoding", BROWSER)]).await;
    assert!(got.headers.get("content-encoding").is_none());
    assert_eq!(got.bytes(), &noise);
    // Asked once per entry, not on every hit.
    get_with(addr, "C-8", &[("accept-encoding", BROWSER)]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = String::from_utf8_lossy(admin_get(proxy.admin_addr(), "/metrics").await.bytes()).to_string();
    assert_eq!(metric(&text, "lotecache_variants_not_kept_total{reason=\"not-smaller\"}"), Some(2.0));
}

#[tokio::test]
async fn a_rule_chooses_its_encodings_and_one_with_none_sends_no_vary() {
    let rule = |name: &str, path: &str, compression: &str| {
        format!(
            "[[rules]]\nname = \"{name}\"\npath = \"{path}/{{lote_id}}\"\nkey = \"{name}-{{lote_id}}\"\n[rules.compression]\n{compression}\n"
        )
    };
    let extra = format!(
        "{}{}",
        rule("gz", "/download_batch_results", "encodings = [\"gzip\"]\ngzip_level = 1"),
        rule("plain", "/raw/download_batch_results", "encodings = []"),
    );
    let (origin, _dir, proxy) = setup(&extra).await;
    let addr = proxy.local_addr();
    let doc = document("C-9-64kb");
    get(addr, &batch("C-9-64kb")).await;
    let mut got = None;
    for _ in 0..200 {
        let g = get_with(addr, "C-9-64kb", &[("accept-encoding", BROWSER)]).await;
        if g.headers.get("content-encoding").is_some() {
            got = Some(g);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = got.expect("the gzip variant was built");
    assert_eq!(got.headers["content-encoding"], "gzip", "br is not offered on this rule");
    assert_eq!(decode("gzip", got.bytes()), doc);

    let plain = |h: &'static [(&'static str, &'static str)]| {
        let mut req = request(Method::GET, addr, "/raw/download_batch_results/C-9-64kb");
        for (n, v) in h {
            req.headers_mut().insert(*n, v.parse().unwrap());
        }
        send(req)
    };
    plain(&[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hit = plain(&[("accept-encoding", BROWSER)]).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert!(hit.headers.get("content-encoding").is_none());
    assert!(hit.headers.get("vary").is_none(), "a rule without variants does not vary on Accept-Encoding");
    assert_eq!(hit.bytes(), &doc);
    assert_eq!(origin.generations("C-9-64kb"), 2, "one per rule");
}

#[tokio::test]
async fn variants_survive_a_restart() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = crate::support::start_proxy(origin.addr, dir.path(), "").await;
    stored_with_variants(&proxy, "C-10-64kb").await;
    let before = get_with(proxy.local_addr(), "C-10-64kb", &[("accept-encoding", "br")]).await;
    proxy.shutdown(Duration::from_secs(1)).await;
    let proxy = crate::support::start_proxy(origin.addr, dir.path(), "").await;
    let after = get_with(proxy.local_addr(), "C-10-64kb", &[("accept-encoding", "br")]).await;
    assert_eq!(after.cache_status(), "lotecache; hit");
    assert_eq!(after.headers["content-encoding"], "br");
    assert_eq!(after.headers["etag"], before.headers["etag"]);
    assert_eq!(after.bytes(), before.bytes());
    assert_eq!(origin.generations("C-10-64kb"), 1);
}

#[tokio::test]
async fn a_document_that_fits_a_first_flight_gets_no_variants() {
    // About 6 KB: sent whole it fits in a new connection's first flight, so compressing it
    // saves no round trip; no job is even started.
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    assert!((document("C-12").len() as u64) < lotecache::cache::compress::MIN_BODY);
    for _ in 0..3 {
        let got = get_with(addr, "C-12", &[("accept-encoding", BROWSER)]).await;
        assert!(got.headers.get("content-encoding").is_none());
        assert!(vary_lists_accept_encoding(&got), "the route still varies");
        assert_eq!(proxy.cache().compressions_pending(), 0);
    }
    let entry = admin_get(proxy.admin_addr(), "/entries/C-12_resultados.json").await.json();
    assert_eq!(entry["variants"], serde_json::json!([]));
    let m = proxy.store().metrics().render();
    assert!(!m.contains("lotecache_variants_not_kept_total{"), "no job was started: {m}");
}
