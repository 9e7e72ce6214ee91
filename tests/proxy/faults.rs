//! Origin and store faults: nothing partial or corrupt is served as a complete response or
//! stored.

use crate::support::{batch, get, origin::*, start_proxy};
use http::StatusCode;
use std::time::Duration;

#[tokio::test]
async fn origin_500_and_404_are_passed_through_and_not_stored() {
    let origin = TestOrigin::start().await;
    origin.set("E-500", Behavior::Status(500));
    origin.set("E-404", Behavior::Status(404));
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    for (id, code) in [("E-500", 500), ("E-404", 404)] {
        for _ in 0..2 {
            let got = get(proxy.local_addr(), &batch(id)).await;
            assert_eq!(got.status.as_u16(), code);
            assert_eq!(got.cache_status(), format!("lotecache; fwd=uri-miss; detail=origin-status-{code}"));
            assert_eq!(got.bytes().as_ref(), format!("{{\"error\":\"status {code}\"}}").as_bytes());
        }
        assert_eq!(origin.generations(id), 2);
    }
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn a_body_cut_short_of_its_content_length_is_an_error_and_is_not_stored() {
    let origin = TestOrigin::start().await;
    origin.set("E-cut", Behavior::CutShort { send: 1000 });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let got = get(proxy.local_addr(), &batch("E-cut")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body.is_err(), "a cut body must not end cleanly");
    assert!(proxy.store().is_empty());
    origin.set("E-cut", Behavior::Ok { delay: Duration::ZERO, pieces: 1, gap: Duration::ZERO });
    let again = get(proxy.local_addr(), &batch("E-cut")).await;
    assert_eq!(again.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(again.bytes(), &document("E-cut"));
    assert_eq!(origin.generations("E-cut"), 2);
}

#[tokio::test]
async fn chunked_without_the_last_chunk_is_an_error_and_is_not_stored() {
    let origin = TestOrigin::start().await;
    origin.set("E-chunk", Behavior::ChunkedNoEnd);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let got = get(proxy.local_addr(), &batch("E-chunk")).await;
    assert!(got.body.is_err(), "an unterminated chunked body must not end cleanly");
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn a_close_delimited_body_is_served_but_not_stored() {
    let origin = TestOrigin::start().await;
    origin.set("E-close", Behavior::CloseDelimited { send: None });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let got = get(proxy.local_addr(), &batch("E-close")).await;
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss; detail=no-length");
    assert_eq!(got.bytes(), &document("E-close"));
    let again = get(proxy.local_addr(), &batch("E-close")).await;
    assert_eq!(again.cache_status(), "lotecache; fwd=uri-miss; detail=no-length");
    assert_eq!(origin.generations("E-close"), 2);
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn a_stall_mid_body_past_the_idle_timeout_is_an_error_and_is_not_stored() {
    let origin = TestOrigin::start().await;
    origin.set("E-stall", Behavior::StallMidBody { stall: Duration::from_secs(3) });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let got = get(proxy.local_addr(), &batch("E-stall")).await;
    assert!(got.body.is_err());
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn a_response_with_set_cookie_is_served_but_not_stored() {
    let origin = TestOrigin::start().await;
    origin.set("E-cookie", Behavior::WithHeaders(vec![("set-cookie".into(), "session=abc".into())]));
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let got = get(proxy.local_addr(), &batch("E-cookie")).await;
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss; detail=set-cookie");
    assert_eq!(got.bytes(), &document("E-cookie"));
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn origin_down_gives_502_with_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = start_proxy(closed, dir.path(), "").await;
    for path in [batch("D-1"), "/monitoreo".to_string()] {
        let got = get(proxy.local_addr(), &path).await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{path}");
        assert_eq!(got.headers["content-type"], "application/json");
        let body = got.json();
        assert_eq!(body["error"], "origin unreachable");
        assert!(body["detail"].as_str().unwrap().contains("onnect"), "{body}");
    }
    let cached = get(proxy.local_addr(), &batch("D-1")).await;
    assert_eq!(cached.cache_status(), "lotecache; fwd=uri-miss; detail=origin-unreachable");
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn origin_silent_before_the_head_gives_504_with_a_json_error() {
    let origin = TestOrigin::start().await;
    origin.set("E-hang", Behavior::Hang);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let got = get(proxy.local_addr(), &batch("E-hang")).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(got.json()["error"], "origin timed out");
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss; detail=origin-timeout");
    assert!(proxy.store().is_empty());
}

/// Flips one byte in the middle of the stored content file of `key`.
/// Flips a byte of `key`'s body on disk, once its compressed variants are built (their job
/// reads the body too, and would find the damage first).
async fn flip_a_byte(proxy: &lotecache::RunningProxy, key: &str) {
    crate::support::compression_settled(proxy).await;
    let entry = proxy.store().get(key).expect("stored");
    let mut bytes = std::fs::read(&entry.path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&entry.path, bytes).unwrap();
}

#[tokio::test]
async fn a_flipped_byte_in_a_small_stored_entry_is_never_served_and_is_refetched_at_once() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    get(proxy.local_addr(), &batch("C-small")).await;
    flip_a_byte(&proxy, "C-small_resultados.json").await;

    let got = get(proxy.local_addr(), &batch("C-small")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &document("C-small"), "the corrupt copy was served");
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(origin.generations("C-small"), 2);
    let hit = get(proxy.local_addr(), &batch("C-small")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("C-small"));
}

#[tokio::test]
async fn a_flipped_byte_in_a_large_stored_entry_is_never_sent_and_is_refetched_at_once() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Sent from the file (not the memory tier).
    let proxy = start_proxy(origin.addr, dir.path(), "memory_tier = \"off\"\n").await;
    get(proxy.local_addr(), &batch("C-large-3mb")).await;
    flip_a_byte(&proxy, "C-large-3mb_resultados.json").await;

    let got = get(proxy.local_addr(), &batch("C-large-3mb")).await;
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss", "hashed before the head, found bad");
    assert_eq!(got.bytes(), &document("C-large-3mb"));
    assert_eq!(origin.generations("C-large-3mb"), 2);
    let hit = get(proxy.local_addr(), &batch("C-large-3mb")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("C-large-3mb"));
}

#[tokio::test]
async fn deleted_or_truncated_content_is_refetched_not_served() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    get(proxy.local_addr(), &batch("C-del")).await;
    get(proxy.local_addr(), &batch("C-trunc-2mb")).await;
    crate::support::compression_settled(&proxy).await;
    std::fs::remove_file(&proxy.store().get("C-del_resultados.json").unwrap().path).unwrap();
    let trunc = proxy.store().get("C-trunc-2mb_resultados.json").unwrap().path.clone();
    std::fs::OpenOptions::new().write(true).open(&trunc).unwrap().set_len(100).unwrap();

    for id in ["C-del", "C-trunc-2mb"] {
        let got = get(proxy.local_addr(), &batch(id)).await;
        assert_eq!(got.bytes(), &document(id));
        assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss", "{id}");
        assert_eq!(origin.generations(id), 2);
    }
}

#[tokio::test]
async fn a_small_entry_served_from_memory_is_still_never_served_after_its_file_changes() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "memory_recheck = \"100ms\"\n").await;
    get(proxy.local_addr(), &batch("C-mem")).await;
    assert_eq!(get(proxy.local_addr(), &batch("C-mem")).await.cache_status(), "lotecache; hit");
    assert_eq!(proxy.store().memory_bytes(), document("C-mem").len() as u64, "kept in the memory tier");
    assert_eq!(get(proxy.local_addr(), &batch("C-mem")).await.bytes(), &document("C-mem"));

    flip_a_byte(&proxy, "C-mem_resultados.json").await;
    // Until the next re-check the verified copy in memory is served: the right bytes.
    let meanwhile = get(proxy.local_addr(), &batch("C-mem")).await;
    assert_eq!(meanwhile.bytes(), &document("C-mem"));
    tokio::time::sleep(Duration::from_millis(150)).await; // memory_recheck = 100ms here
    let got = get(proxy.local_addr(), &batch("C-mem")).await;
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss", "the changed file is re-verified, found bad");
    assert_eq!(got.bytes(), &document("C-mem"));
    assert_eq!(origin.generations("C-mem"), 2);
}

#[tokio::test]
async fn a_large_entry_verified_once_is_verified_again_after_its_file_changes() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "memory_tier = \"off\"\n").await;
    get(proxy.local_addr(), &batch("C-big-3mb")).await;
    for _ in 0..2 {
        // Hashed on the first hit, trusted (and sent with sendfile) on the next.
        let hit = get(proxy.local_addr(), &batch("C-big-3mb")).await;
        assert_eq!(hit.cache_status(), "lotecache; hit");
        assert_eq!(hit.bytes(), &document("C-big-3mb"));
    }
    flip_a_byte(&proxy, "C-big-3mb_resultados.json").await;
    let got = get(proxy.local_addr(), &batch("C-big-3mb")).await;
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss", "a trusted file that changed is hashed again");
    assert_eq!(got.bytes(), &document("C-big-3mb"));
    assert_eq!(origin.generations("C-big-3mb"), 2);
}

#[tokio::test]
async fn the_scrubber_evicts_a_corrupt_entry_before_anyone_asks_for_it() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "scrub_rate = \"64MiB\"\n").await;
    get(proxy.local_addr(), &batch("C-scrub")).await;
    get(proxy.local_addr(), &batch("C-ok")).await;
    flip_a_byte(&proxy, "C-scrub_resultados.json").await;
    crate::support::wait_until(Duration::from_secs(15), || proxy.store().get("C-scrub_resultados.json").is_none())
        .await;
    assert!(proxy.store().get("C-scrub_resultados.json").is_none(), "the scrubber found it");
    assert!(proxy.store().get("C-ok_resultados.json").is_some(), "good entries stay");
}

#[tokio::test]
async fn a_large_entry_in_the_memory_tier_whose_file_changes_is_refetched_within_the_request() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "memory_recheck = \"100ms\"\nmemory_object_max = \"4MiB\"\n";
    let proxy = start_proxy(origin.addr, dir.path(), extra).await;
    get(proxy.local_addr(), &batch("C-tier-3mb")).await;
    assert_eq!(get(proxy.local_addr(), &batch("C-tier-3mb")).await.bytes(), &document("C-tier-3mb"));
    assert_eq!(proxy.store().memory_bytes(), document("C-tier-3mb").len() as u64);
    flip_a_byte(&proxy, "C-tier-3mb_resultados.json").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let got = get(proxy.local_addr(), &batch("C-tier-3mb")).await;
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(got.bytes(), &document("C-tier-3mb"));
    assert_eq!(origin.generations("C-tier-3mb"), 2);
}

/// Changes one byte in the middle of `path` without truncating it (the file may be mapped).
fn flip_in_place(path: &std::path::Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mid = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(mid)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(mid)).unwrap();
    f.write_all(&[b[0] ^ 1]).unwrap();
}

#[tokio::test]
async fn a_trusted_large_entry_is_sent_from_its_file_and_a_change_mid_send_aborts_it() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let p = proxy.local_addr();
    get(p, &batch("Z-8mb")).await;
    for _ in 0..2 {
        // The first hit hashes the file; the next ones send it with sendfile.
        let hit = get(p, &batch("Z-8mb")).await;
        assert_eq!(hit.cache_status(), "lotecache; hit");
        assert_eq!(hit.bytes(), &document("Z-8mb"));
    }
    // A slow reader starts a zero-copy send; the file changes before its end.
    use tokio::io::AsyncReadExt;
    let mut slow = crate::support::raw::slow_reader(p, &batch("Z-8mb")).await;
    let mut first = vec![0u8; 4096];
    slow.read_exact(&mut first).await.unwrap();
    flip_in_place(&proxy.store().get("Z-8mb_resultados.json").unwrap().path);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    let received = first.len() + rest.len();
    let head_len = first.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(received - head_len < document("Z-8mb").len(), "a changed file must not complete the response");
    // The next request re-verifies, finds the damage and refetches.
    let next = get(p, &batch("Z-8mb")).await;
    assert_eq!(next.bytes(), &document("Z-8mb"));
    assert_eq!(origin.generations("Z-8mb"), 2);
}

#[tokio::test]
async fn a_range_that_ends_before_the_file_does_is_aborted_too_when_the_file_changes_mid_send() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let p = proxy.local_addr();
    get(p, &batch("Z2-8mb")).await;
    get(p, &batch("Z2-8mb")).await; // hashed: the next ones are sent with sendfile
                                    // Bytes 0..6 MiB: the flipped byte (at 4 MiB) is inside, the file's end is not.
    let range_end = 6 * 1024 * 1024 - 1;
    use tokio::io::AsyncReadExt;
    let mut slow =
        crate::support::raw::slow_reader_with(p, &batch("Z2-8mb"), &format!("range: bytes=0-{range_end}\r\n")).await;
    let mut first = vec![0u8; 4096];
    slow.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 206 "), "{}", String::from_utf8_lossy(&first[..40]));
    flip_in_place(&proxy.store().get("Z2-8mb_resultados.json").unwrap().path);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    let head_len = first.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(first.len() + rest.len() - head_len < range_end + 1, "a changed file must not complete the 206");
}
