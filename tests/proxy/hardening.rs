//! The hardening defects found by an outside review, one behaviour test each: per-user
//! response headers, credentials in unexpected headers, bounded fills, HTTP/1.0 framing,
//! validation of answers that are not stored, rule namespaces, object-size and free-space
//! limits, eviction and re-storing races, and transient read errors.

use crate::support::raw::raw;
use crate::support::{assert_intact, batch, get, origin::*, request, send, setup, shipped_rules, start_proxy};
use bytes::Bytes;
use http::{Method, StatusCode};
use std::time::Duration;

/// A rule on the batch route with an access check on the test origin's `/auth/{lote_id}`.
const AUTH_RULE: &str = "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{lote_id}\"\nignore_response = [\"set-cookie\"]\n[rules.auth]\nurl = \"/auth/{lote_id}\"\n";

fn with_header(
    proxy: std::net::SocketAddr,
    id: &str,
    name: &str,
    value: &str,
) -> http::Request<http_body_util::Full<Bytes>> {
    let mut req = request(Method::GET, proxy, &batch(id));
    req.headers_mut().insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    req
}

/// The headers the origin received on its (only) request for batch `id`.
fn fill_headers_seen(origin: &TestOrigin, id: &str) -> Vec<(String, String)> {
    let seen: Vec<_> = origin.seen().into_iter().filter(|s| s.target == batch(id)).collect();
    assert_eq!(seen.len(), 1, "one fill for {id}");
    seen[0].headers.clone()
}

// 1. Per-user response headers.

#[tokio::test]
async fn a_joiner_never_receives_another_requests_set_cookie() {
    let (origin, _dir, proxy) = setup(AUTH_RULE).await;
    let p = proxy.local_addr();
    origin.set(
        "SC-1",
        Behavior::Delayed(
            Duration::from_millis(400),
            Box::new(Behavior::WithHeaders(vec![
                ("set-cookie".into(), "session=alice-refreshed".into()),
                ("clear-site-data".into(), "\"cookies\"".into()),
            ])),
        ),
    );
    let alice = tokio::spawn(send(with_header(p, "SC-1", "cookie", "user=ok; who=alice")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let bob = send(with_header(p, "SC-1", "cookie", "user=ok; who=bob")).await;
    let alice = alice.await.unwrap();
    assert_eq!(origin.generations("SC-1"), 1, "bob joined alice's fill");
    assert_eq!(alice.bytes(), &document("SC-1"));
    assert_eq!(alice.headers["set-cookie"], "session=alice-refreshed", "the requester gets its own cookie");
    assert_eq!(bob.bytes(), &document("SC-1"));
    assert_eq!(bob.cache_status(), "lotecache; fwd=uri-miss; collapsed");
    assert!(bob.headers.get("set-cookie").is_none(), "bob got alice's session: {:?}", bob.headers);
    assert!(bob.headers.get("clear-site-data").is_none(), "bob was told to clear his data");
    let hit = send(with_header(p, "SC-1", "cookie", "user=ok; who=carol")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert!(hit.headers.get("set-cookie").is_none() && hit.headers.get("clear-site-data").is_none());
}

// 2. Credentials in other headers; what a fill forwards.

#[tokio::test]
async fn credentials_in_other_headers_bypass_the_cache_on_a_rule_without_an_access_policy() {
    let (origin, _dir, proxy) = setup("").await;
    let p = proxy.local_addr();
    for (name, value) in
        [("x-api-key", "secret-1"), ("x-forwarded-user", "alice"), ("x-ssl-client-cert", "-----BEGIN%20CERT")]
    {
        let got = send(with_header(p, "CR-1", name, value)).await;
        assert_eq!(got.bytes(), &document("CR-1"));
        assert_eq!(got.cache_status(), "lotecache; fwd=bypass; detail=credentials", "{name}");
    }
    assert!(proxy.store().is_empty(), "nothing fetched with credentials is stored");
    let anonymous = get(p, &batch("CR-1")).await;
    assert_eq!(anonymous.cache_status(), "lotecache; fwd=uri-miss");
    let keyed = send(with_header(p, "CR-1", "x-api-key", "secret-2")).await;
    assert_eq!(keyed.cache_status(), "lotecache; fwd=bypass; detail=credentials", "never the stored copy");
    assert_eq!(origin.generations("CR-1"), 5);
}

#[tokio::test]
async fn a_fill_forwards_only_the_documented_headers_and_credentials_only_after_an_access_check() {
    let (origin, _dir, proxy) = setup("").await;
    let mut req = request(Method::GET, proxy.local_addr(), &batch("FH-1"));
    for (k, v) in
        [("accept-language", "es"), ("user-agent", "ua-test"), ("x-tenant-debug", "1"), ("x-request-id", "r1")]
    {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    assert_eq!(send(req).await.status, StatusCode::OK);
    let seen = fill_headers_seen(&origin, "FH-1");
    let has = |name: &str| seen.iter().any(|(k, _)| k == name);
    assert!(has("accept-language") && has("user-agent") && has("x-request-id"), "{seen:?}");
    assert!(!has("x-tenant-debug"), "an unlisted client header reached the fill: {seen:?}");

    // On a rule with an access check, the checked request's credentials go on its fill.
    let (origin, _dir, proxy) = setup(AUTH_RULE).await;
    let got = send(with_header(proxy.local_addr(), "FH-2", "cookie", "user=ok; who=alice")).await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = fill_headers_seen(&origin, "FH-2");
    assert!(seen.iter().any(|(k, v)| k == "cookie" && v == "user=ok; who=alice"), "{seen:?}");
}

#[tokio::test]
async fn a_rule_may_name_the_headers_its_fills_forward_but_never_a_credential() {
    let (origin, _dir, proxy) = setup(
        "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{lote_id}\"\nforward_headers = [\"x-tenant\"]\n",
    )
    .await;
    let mut req = with_header(proxy.local_addr(), "FH-3", "x-tenant", "t1");
    req.headers_mut().insert("accept-language", "es".parse().unwrap());
    assert_eq!(send(req).await.status, StatusCode::OK);
    let seen = fill_headers_seen(&origin, "FH-3");
    assert!(seen.iter().any(|(k, v)| k == "x-tenant" && v == "t1"), "{seen:?}");
    assert!(!seen.iter().any(|(k, _)| k == "accept-language"), "the list replaces the default: {seen:?}");

    let bad = "[[rules]]\nname = \"b\"\npath = \"/d/{lote_id}\"\nforward_headers = [\"x-api-key\"]\n";
    let errors = lotecache::config::parse("t.toml", bad, &Default::default()).unwrap_err();
    assert!(
        errors.iter().any(|e| e.field == "rules.forward_headers" && e.message.contains("credential")),
        "{errors:?}"
    );
}

#[tokio::test]
async fn an_origin_401_to_a_fill_is_passed_through_and_never_stored() {
    let (origin, _dir, proxy) = setup("").await;
    origin.set("AU-1", Behavior::Status(401));
    for n in 1..=2 {
        let got = get(proxy.local_addr(), &batch("AU-1")).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
        assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss; detail=origin-status-401");
        assert_eq!(origin.generations("AU-1"), n);
    }
    assert!(proxy.store().is_empty());
}

// 3. Bounded fills; hits never wait for them.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_fills_beyond_the_limit_queue_or_get_503_and_a_hit_never_waits_for_them() {
    let (origin, _dir, proxy) =
        setup(&format!("max_fills = 2\nfill_queue = 4\nreplay_buffer = \"256KiB\"\n{}", shipped_rules())).await;
    let p = proxy.local_addr();
    assert_eq!(get(p, &batch("BF-hit-300kb")).await.status, StatusCode::OK);
    let ids: Vec<String> = (0..12).map(|i| format!("BF-{i}-300kb")).collect();
    for id in &ids {
        let slow = Behavior::Ok { delay: Duration::from_millis(1500), pieces: 1, gap: Duration::ZERO };
        origin.set(id, slow);
    }
    let cold: Vec<_> = ids
        .iter()
        .map(|id| {
            let path = batch(id);
            tokio::spawn(async move { get(p, &path).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every fill is still waiting on the origin (or for a slot) when the hit is answered;
    // only refusals are done by then.
    let hit = get(p, &batch("BF-hit-300kb")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit; access=cached");
    assert_eq!(hit.bytes(), &document("BF-hit-300kb"));
    let finished_before_the_hit: Vec<bool> = cold.iter().map(|c| c.is_finished()).collect();
    let mut served = 0;
    let mut busy = 0;
    for ((c, id), early) in cold.into_iter().zip(&ids).zip(finished_before_the_hit) {
        let got = c.await.unwrap();
        match got.status {
            StatusCode::OK => {
                assert!(!early, "{id}: the hit waited for this fill to finish");
                assert_eq!(got.bytes(), &document(id));
                served += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(got.headers["retry-after"], "1");
                assert_eq!(got.json()["error"], "too many origin fetches in progress");
                assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss; detail=busy");
                busy += 1;
            }
            other => panic!("{id}: {other}"),
        }
    }
    assert_eq!((served, busy), (6, 6), "2 running + 4 queued served, the rest refused");
    let generated: u64 = ids.iter().map(|id| origin.generations(id)).sum();
    assert_eq!(generated, 6, "a refused request never reached the origin");
}

#[tokio::test]
async fn with_no_fill_slot_an_expired_entry_is_served_stale_rather_than_refused() {
    let rule = "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{lote_id}\"\nttl = \"1s\"\n";
    let (origin, _dir, proxy) = setup(&format!("max_fills = 1\nfill_queue = 0\n{rule}")).await;
    let p = proxy.local_addr();
    assert_eq!(get(p, &batch("ST-1")).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await; // expired now
    origin.set("ST-slow", Behavior::Ok { delay: Duration::from_millis(1500), pieces: 1, gap: Duration::ZERO });
    let slow = tokio::spawn(async move { get(p, &batch("ST-slow")).await });
    tokio::time::sleep(Duration::from_millis(200)).await; // the one slot is taken
    let got = get(p, &batch("ST-1")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.cache_status(), "lotecache; hit; fwd=stale; fwd-status=503; detail=stale-if-error");
    assert_eq!(got.bytes(), &document("ST-1"));
    let cold = get(p, &batch("ST-2")).await;
    assert_eq!(cold.status, StatusCode::SERVICE_UNAVAILABLE, "nothing stored to stand in");
    assert_eq!(slow.await.unwrap().bytes(), &document("ST-slow"));
}

// 4. HTTP/1.0 clients.

/// Status and body of a raw HTTP/1.0 exchange, and its Content-Length if any.
async fn http10_get(proxy: std::net::SocketAddr, id: &str) -> (u16, Option<usize>, Vec<u8>) {
    let req = format!("GET {} HTTP/1.0\r\nHost: a\r\n\r\n", batch(id));
    let reply = raw(proxy, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(reply.closed, "an HTTP/1.0 exchange ends with the connection");
    let split = reply.bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&reply.bytes[..split]).to_ascii_lowercase();
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap();
    let length = head.lines().find_map(|l| l.strip_prefix("content-length: ")).map(|v| v.trim().parse().unwrap());
    (status, length, reply.bytes[split + 4..].to_vec())
}

#[tokio::test]
async fn an_http10_client_gets_a_body_of_unknown_length_framed_or_an_error_never_cut_short() {
    let (origin, _dir, proxy) = setup("").await;
    origin.set("H10-1", Behavior::Chunked);
    let (status, length, body) = http10_get(proxy.local_addr(), "H10-1").await;
    assert_eq!(status, 200);
    assert_eq!(length, Some(document("H10-1").len()), "sent with its length");
    assert_eq!(body, document("H10-1"));

    origin.set("H10-2", Behavior::ChunkedNoEnd);
    let (status, length, body) = http10_get(proxy.local_addr(), "H10-2").await;
    assert_eq!(status, 502, "a cut fill is an error for an HTTP/1.0 client, not a short 200");
    assert_eq!(length, Some(body.len()));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "cannot frame the response for this client");
    assert!(proxy.store().get("H10-2_resultados.json").is_none());
}

#[tokio::test]
async fn an_http10_client_of_a_document_larger_than_the_buffer_is_served_from_the_store() {
    let (origin, _dir, proxy) = setup("replay_buffer = \"256KiB\"\n").await;
    origin.set("H10-3-1mb", Behavior::Chunked);
    let (status, length, body) = http10_get(proxy.local_addr(), "H10-3-1mb").await;
    assert_eq!(status, 200);
    assert_eq!(length, Some(document("H10-3-1mb").len()));
    assert_eq!(body, document("H10-3-1mb"));
    assert_eq!(origin.generations("H10-3-1mb"), 1);
}

// 5. Validation of answers that will not be stored.

#[tokio::test]
async fn a_validated_route_checks_every_answer_even_one_it_will_not_store() {
    let other = Bytes::from(document("V-OTHER").to_vec());
    for (id, header) in [
        ("VN-1", ("set-cookie", "s=1")),
        ("VN-2", ("cache-control", "no-store")),
        ("VN-3", ("cache-control", "private")),
        ("VN-4", ("content-encoding", "gzip")),
    ] {
        let (origin, _dir, proxy) = setup(&shipped_rules()).await;
        origin.set(id, Behavior::CustomWithHeaders(other.clone(), vec![(header.0.into(), header.1.into())]));
        let got = get(proxy.local_addr(), &batch(id)).await;
        assert_intact(&got, id);
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{id} with {header:?}");
        assert!(proxy.store().is_empty());
    }
    // Over the route's size limit: not stored, still checked.
    let rules = shipped_rules().replacen("json = true", "json = true\nmax_object_size = \"1KiB\"", 1);
    let (origin, _dir, proxy) = setup(&rules).await;
    origin.set("VN-5", Behavior::Custom(other.clone()));
    let got = get(proxy.local_addr(), &batch("VN-5")).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn a_head_request_never_vouches_for_a_document_that_fails_validation_after_its_head() {
    let id = "VH-1-2mb";
    let mut wrong: serde_json::Value = serde_json::from_slice(&document(id)).unwrap();
    let last = wrong["archivos_procesados"].as_array().unwrap().len() - 1;
    wrong["archivos_procesados"][last]["lote_id"] = "VH-OTHER".into();
    let (origin, _dir, proxy) = setup(&format!("replay_buffer = \"512KiB\"\n{}", shipped_rules())).await;
    origin.set(id, Behavior::Custom(Bytes::from(wrong.to_string())));
    let head = send(request(Method::HEAD, proxy.local_addr(), &batch(id))).await;
    assert_eq!(head.status, StatusCode::BAD_GATEWAY, "a HEAD vouched for another batch's document");
    assert!(proxy.store().is_empty());
}

// 6. Rule namespaces.

#[tokio::test]
async fn entries_of_two_rules_whose_keys_coincide_are_never_confused() {
    // Rule "b" (first) keys `B<id>` as `X<id>`; rule "a" keys `<id>` as `<id>_r.json`:
    // `/…/X1` (rule a) and `/…/B1_r.json` (rule b) both make the key `X1_r.json`.
    let rules = "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/B{lote_id}\"\nkey = \"X{lote_id}\"\n\
                 [[rules]]\nname = \"a\"\npath = \"/download_batch_results/{lote_id}\"\nkey = \"{lote_id}_r.json\"\n";
    let (origin, _dir, proxy) = setup(rules).await;
    let p = proxy.local_addr();
    for _ in 0..2 {
        let a = get(p, &batch("X1")).await;
        assert_eq!(a.bytes(), &document("X1"));
        let b = get(p, &batch("B1_r.json")).await;
        assert_eq!(b.bytes(), &document("B1_r.json"), "rule b was served rule a's document");
    }
    assert!(origin.generations("X1") >= 1 && origin.generations("B1_r.json") >= 1);
}

#[test]
fn check_config_rejects_two_rules_with_one_key_template() {
    let rules = "[[rules]]\nname = \"a\"\npath = \"/a/{lote_id}\"\n[[rules]]\nname = \"b\"\npath = \"/b/{lote_id}\"\n";
    let errors = lotecache::config::parse("t.toml", rules, &Default::default()).unwrap_err();
    assert!(errors.iter().any(|e| e.field == "rules.key" && e.message.contains("same key template")), "{errors:?}");
}

// 7. Object size and free space.

#[tokio::test]
async fn a_body_over_max_object_size_is_served_never_written_and_evicts_nothing() {
    let rules = "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{lote_id}\"\nmax_object_size = \"100KiB\"\n";
    let (origin, dir, proxy) = setup(&format!("max_size = \"1MiB\"\n{rules}")).await;
    let p = proxy.local_addr();
    assert_eq!(get(p, &batch("MO-small")).await.cache_status(), "lotecache; fwd=uri-miss");
    // Known too large from its Content-Length: the head says so. Of unknown length: found
    // out while streaming, after the head went out.
    let with_length = Behavior::Ok { delay: Duration::ZERO, pieces: 1, gap: Duration::ZERO };
    for (id, behavior, said) in [
        ("MO-1-256kb", with_length, "lotecache; fwd=uri-miss; detail=too-large"),
        ("MO-2-256kb", Behavior::Chunked, "lotecache; fwd=uri-miss"),
    ] {
        origin.set(id, behavior);
        let got = get(p, &batch(id)).await;
        assert_eq!(got.bytes(), &document(id), "served whole");
        assert_eq!(got.cache_status(), said, "{id}");
    }
    assert_eq!(proxy.store().len(), 1, "the small entry is still there");
    assert!(proxy.store().get("MO-small_resultados.json").is_some());
    let tmp = std::fs::read_dir(dir.path().join("tmp")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(tmp, 0, "no partial write left behind");
}

#[tokio::test]
async fn a_body_of_unknown_length_over_max_size_never_empties_the_store() {
    let (origin, _dir, proxy) = setup("max_size = \"200KiB\"\n").await;
    let p = proxy.local_addr();
    for id in ["MS-a", "MS-b"] {
        assert_eq!(get(p, &batch(id)).await.cache_status(), "lotecache; fwd=uri-miss");
    }
    origin.set("MS-big-256kb", Behavior::Chunked);
    let got = get(p, &batch("MS-big-256kb")).await;
    assert_eq!(got.bytes(), &document("MS-big-256kb"));
    assert!(proxy.store().get("MS-big-256kb_resultados.json").is_none());
    assert_eq!(proxy.store().len(), 2, "nothing was evicted for an entry that cannot fit");
}

#[tokio::test]
async fn below_min_free_answers_are_served_and_not_stored() {
    let (_origin, _dir, proxy) = setup("min_free = \"1000000TiB\"\n").await;
    let got = get(proxy.local_addr(), &batch("MF-1")).await;
    assert_eq!(got.bytes(), &document("MF-1"));
    assert_eq!(got.cache_status(), "lotecache; fwd=uri-miss; detail=disk-full");
    assert!(proxy.store().is_empty());
}

// 8. Eviction of a stale version.

#[tokio::test]
async fn evicting_a_stale_version_never_deletes_the_newer_entrys_content_file() {
    let (_origin, _dir, proxy) = setup("").await;
    let p = proxy.local_addr();
    get(p, &batch("EV-1")).await;
    let old = proxy.store().get("EV-1_resultados.json").unwrap();
    let purge = lotecache::cache::store::Purge::Key("EV-1_resultados.json".into());
    assert_eq!(proxy.store().purge(purge).await.unwrap().len(), 1);
    assert_eq!(get(p, &batch("EV-1")).await.bytes(), &document("EV-1"));
    let new = proxy.store().get("EV-1_resultados.json").expect("refetched and stored");
    assert_eq!(old.path, new.path, "same bytes, same content file");
    // A slow scrub pass judging its old snapshot of the entry:
    proxy.store().evict(&old, "digest-mismatch").await;
    assert!(new.path.exists(), "the live entry's file was deleted");
    let hit = get(p, &batch("EV-1")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("EV-1"));
}

// 9. Transient read errors.

#[tokio::test]
async fn a_stored_entry_that_cannot_be_read_in_time_answers_503_and_is_kept() {
    let (origin, _dir, proxy) = setup("memory_tier = \"0\"\n").await;
    let p = proxy.local_addr();
    get(p, &batch("RE-1")).await;
    // Its variants built first: their job reads the body too.
    crate::support::compression_settled(&proxy).await;
    let entry = proxy.store().get("RE-1_resultados.json").unwrap();
    // A FIFO in place of the file: opening it blocks, as a stalled disk would.
    let saved = std::fs::read(&entry.path).unwrap();
    std::fs::remove_file(&entry.path).unwrap();
    let path = std::ffi::CString::new(entry.path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let got = get(p, &batch("RE-1")).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.headers["retry-after"], "1");
    assert_eq!(got.json()["error"], "cache store temporarily unreadable");
    assert!(proxy.store().get("RE-1_resultados.json").is_some(), "nothing proved the entry bad: kept");
    assert_eq!(origin.generations("RE-1"), 1, "not regenerated");
    // Release the blocked open, put the bytes back: the next click is a hit again.
    use std::os::unix::fs::OpenOptionsExt;
    let writer = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&entry.path);
    drop(writer);
    std::fs::remove_file(&entry.path).unwrap();
    std::fs::write(&entry.path, saved).unwrap();
    let hit = get(p, &batch("RE-1")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("RE-1"));
}

// 10. Re-storing identical bytes.

#[tokio::test]
async fn storing_the_same_bytes_again_never_disturbs_a_download_in_progress() {
    use tokio::io::AsyncReadExt;
    let (_origin, _dir, proxy) = setup("memory_tier = \"0\"\n").await;
    let p = proxy.local_addr();
    let id = "RS-16mb";
    get(p, &batch(id)).await;
    // Verified once: the next hit is sent from the file. A download that reads only its
    // start: the rest waits in the proxy's send (16 MB is more than the socket buffers hold).
    get(p, &batch(id)).await;
    let mut slow = tokio::net::TcpStream::connect(p).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, format!("GET {} HTTP/1.1\r\nhost: x\r\n\r\n", batch(id)).as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let n = slow.read(&mut buf).await.unwrap();
    got.extend_from_slice(&buf[..n]);
    // Purge and refetch: the same bytes are committed again under the same digest.
    let purge = lotecache::cache::store::Purge::Key(format!("{id}_resultados.json"));
    assert_eq!(proxy.store().purge(purge).await.unwrap().len(), 1);
    let doc = document(id);
    assert_eq!(get(p, &batch(id)).await.bytes(), &doc);
    assert!(proxy.store().get(&format!("{id}_resultados.json")).is_some(), "stored again");
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("the head came first") + 4;
    while got.len() - head_end < doc.len() {
        match tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await.unwrap() {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(got.len() - head_end, doc.len(), "the download in progress was cut");
    assert!(got[head_end..] == doc[..]);
}

// 11. Smaller ones.

#[tokio::test]
async fn control_characters_an_id_pattern_lets_through_never_reach_a_log_line_raw() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, cache, config) = (dir.path().join("log.txt"), dir.path().join("cache"), dir.path().join("c.toml"));
    // A pattern that accepts anything, control characters included.
    let rule =
        "[[rules]]\nname = \"any\"\npath = \"/download_batch_results/{lote_id}\"\nid_pattern = \"(?s).{1,64}\"\n";
    std::fs::write(&config, rule).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let server = crate::support::process::serve_logging(origin.addr, &cache, &args, Some(&log)).await;
    let got = get(server.addr(), "/download_batch_results/A%0d%0aINJECTED%20fake%1b[2J").await;
    assert_eq!(got.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("entry stored"), "{text}");
    assert!(text.lines().all(|l| !l.starts_with("INJECTED")), "a client forged a log line:\n{text}");
    assert!(!text.contains('\x1b') && !text.contains('\r'), "raw control characters in the log:\n{text:?}");
    assert!(text.contains(r"A\r\nINJECTED fake\u{1b}[2J"), "the id is logged escaped:\n{text}");
}

#[tokio::test]
async fn a_read_finishing_after_its_entry_was_replaced_leaves_no_memory_tier_bytes_behind() {
    let (_origin, _dir, proxy) = setup("").await;
    let p = proxy.local_addr();
    get(p, &batch("MT-1")).await;
    let old = proxy.store().get("MT-1_resultados.json").unwrap();
    let purge = lotecache::cache::store::Purge::Key("MT-1_resultados.json".into());
    proxy.store().purge(purge).await.unwrap();
    assert_eq!(proxy.store().memory_bytes(), 0);
    // A first read of the old entry that finishes only now, after the purge:
    lotecache::cache::read::open(proxy.store().clone(), old).await.unwrap();
    assert_eq!(proxy.store().memory_bytes(), 0, "bytes counted for an entry nobody can reach");
}

/// A one-connection-at-a-time server answering every request with `head` and then `body_len`
/// bytes trickled one per 100 ms (an access check that never finishes its answer).
async fn endless_answer(head: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..600 {
                    if s.write_all(&[b'x'; 1024]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_access_check_answer_is_read_within_its_size_and_time_limits() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let allows = endless_answer("HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n").await;
    let refuses = endless_answer("HTTP/1.1 403 Forbidden\r\ncontent-length: 100000000\r\n\r\n").await;
    let rules = format!(
        "[[rules]]\nname = \"a\"\npath = \"/download_batch_results/A{{lote_id}}\"\n[rules.auth]\nurl = \"http://{allows}/{{lote_id}}\"\ntimeout = \"1s\"\n\
         [[rules]]\nname = \"r\"\npath = \"/download_batch_results/R{{lote_id}}\"\nkey = \"R{{lote_id}}\"\n[rules.auth]\nurl = \"http://{refuses}/{{lote_id}}\"\ntimeout = \"1s\"\n"
    );
    let proxy = start_proxy(origin.addr, dir.path(), &rules).await;
    let p = proxy.local_addr();
    // Allowed: the endless answer is abandoned after the check's timeout, and the batch served.
    let got = tokio::time::timeout(Duration::from_secs(10), send(with_header(p, "A-1", "cookie", "u=1")))
        .await
        .expect("the request never ended: the check's answer was read without limit");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes(), &document("A-1"));
    // Refused with an answer too large to pass on: the check failed, closed.
    let got = tokio::time::timeout(Duration::from_secs(10), send(with_header(p, "R-1", "cookie", "u=1")))
        .await
        .expect("the request never ended: the refusal was read without limit");
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.json()["error"], "access check failed");
    assert_eq!(origin.generations("R-1"), 0);
}

#[tokio::test]
async fn evictions_are_counted_under_their_own_reason() {
    let (_origin, _dir, proxy) = setup("memory_tier = \"0\"\n").await;
    let p = proxy.local_addr();
    get(p, &batch("EL-1")).await;
    // Its variants built first: their job reads the body too, and would judge it first.
    crate::support::compression_settled(&proxy).await;
    let entry = proxy.store().get("EL-1_resultados.json").unwrap();
    let mut bytes = std::fs::read(&entry.path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&entry.path, bytes).unwrap();
    assert_eq!(get(p, &batch("EL-1")).await.bytes(), &document("EL-1"), "refetched");
    let metrics = proxy.store().metrics().render();
    assert!(metrics.contains("lotecache_evictions_total{reason=\"digest-mismatch\"} 1"), "{metrics}");
    assert!(!metrics.contains("reason=\"corrupt\""), "{metrics}");
}

#[tokio::test]
async fn the_access_log_counts_the_bytes_the_client_was_sent_not_those_handed_to_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, cache) = (dir.path().join("log.txt"), dir.path().join("cache"));
    let server = crate::support::process::serve_logging(origin.addr, &cache, &[], Some(&log)).await;
    let id = "AL-16mb";
    let doc_len = document(id).len() as u64;
    assert_eq!(get(server.addr(), &batch(id)).await.status, StatusCode::OK);
    assert_eq!(get(server.addr(), &batch(id)).await.status, StatusCode::OK);
    // A client that reads 64 KiB of the (file-backed, taken whole by hyper) body and leaves.
    let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    s.write_all(format!("GET {} HTTP/1.1\r\nhost: x\r\n\r\n", batch(id)).as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let _ = s.read(&mut buf).await.unwrap();
    drop(s);
    let lines = |text: &str| -> Vec<(u64, String)> {
        text.lines()
            .filter(|l| l.contains("lotecache::access") && l.contains(id))
            .map(|l| {
                let field = |name: &str| {
                    let rest =
                        &l[l.find(&format!(" {name}=")).unwrap_or_else(|| panic!("{name} in {l}")) + name.len() + 2..];
                    rest.split(' ').next().unwrap().trim_matches('"').to_string()
                };
                (field("bytes").parse().unwrap(), field("end"))
            })
            .collect()
    };
    let mut found = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        found = lines(&std::fs::read_to_string(&log).unwrap());
        if found.len() == 3 {
            break;
        }
    }
    assert_eq!(found.len(), 3, "{found:?}");
    // The miss's head went out before the commit; its line says how the fill ended.
    let text = std::fs::read_to_string(&log).unwrap();
    let first = text.lines().find(|l| l.contains("lotecache::access") && l.contains(id)).unwrap();
    assert!(first.contains("fill=\"lotecache; fwd=uri-miss; stored\""), "{first}");
    assert_eq!(found[0], (doc_len, "complete".to_string()));
    assert_eq!(found[1], (doc_len, "complete".to_string()));
    let (bytes, end) = &found[2];
    assert_eq!(end, "client-gone", "a download the client left was logged {end}");
    assert!(*bytes < doc_len / 2, "logged {bytes} of {doc_len} bytes for a client that read 64 KiB");
}

#[tokio::test]
async fn access_log_lines_of_a_kept_alive_connection_are_written_without_waiting_for_its_end() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = TestOrigin::start().await;
    origin.set("KA-1", Behavior::Chunked); // framed by hyper: chunked
    origin.set("KA-2", Behavior::Refuse); // the proxy's own 502: Content-Length set by hyper
    let dir = tempfile::tempdir().unwrap();
    let (log, cache) = (dir.path().join("log.txt"), dir.path().join("cache"));
    let server = crate::support::process::serve_logging(origin.addr, &cache, &[], Some(&log)).await;
    let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (id, ends_with) in [("KA-1", &b"0\r\n\r\n"[..]), ("KA-2", &b"}"[..])] {
        got.clear();
        s.write_all(format!("GET {} HTTP/1.1\r\nhost: x\r\n\r\n", batch(id)).as_bytes()).await.unwrap();
        while !got.ends_with(ends_with) {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "the connection stays open");
            got.extend_from_slice(&buf[..n]);
        }
    }
    // Both lines are written while the connection is still open.
    let mut lines = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = std::fs::read_to_string(&log).unwrap();
        lines = text.lines().filter(|l| l.contains("lotecache::access")).map(str::to_string).collect();
        if lines.len() == 2 {
            break;
        }
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| l.contains("end=\"complete\"") || l.contains("end=complete")), "{lines:?}");
    drop(s);
}
