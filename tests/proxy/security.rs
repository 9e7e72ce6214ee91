//! Security: request smuggling, cache poisoning and deception, per-user data, floods.
//! Framing cases talk raw HTTP over TCP.

use crate::support::raw::raw;
use crate::support::{batch, get, origin::*, request, send, setup, start_proxy};
use http::{Method, StatusCode};
use std::time::Duration;

const WAIT: Duration = Duration::from_millis(1500);

/// A malformed request: refused with `status` and a JSON error body, the connection closed,
/// the origin untouched.
async fn assert_refused(request: &str, status: u16) {
    let (origin, _dir, proxy) = setup("").await;
    let reply = raw(proxy.local_addr(), request.as_bytes(), WAIT).await;
    let shown: String = request.chars().take(120).collect();
    let got: String = reply.text().chars().take(300).collect();
    assert_eq!(reply.status(), Some(status), "{shown:?} got {got:?}");
    assert_json_error(&reply, &shown);
    assert!(reply.closed, "{shown:?}: the connection must be closed");
    assert!(origin.seen().is_empty(), "{shown:?} reached the origin");
}

/// The (only) response in `reply` is a JSON error: `content-type`, `content-length` and an
/// `{"error","detail"}` body.
fn assert_json_error(reply: &crate::support::raw::RawReply, shown: &str) {
    let text = reply.text();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\ncontent-type: application/json"), "{shown:?} got {text:?}");
    assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())), "{shown:?} got {text:?}");
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{shown:?}: {e}: {text:?}"));
    assert!(json["error"].is_string() && json["detail"].is_string(), "{shown:?} got {json}");
}

#[tokio::test]
async fn conflicting_content_lengths_are_refused() {
    assert_refused("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", 400).await;
    assert_refused("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 5\r\n\r\nabcde", 400).await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    assert_refused(
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
    )
    .await;
    assert_refused(
        "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        400,
    )
    .await;
}

#[tokio::test]
async fn transfer_encodings_other_than_chunked_are_refused() {
    assert_refused("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400).await;
    assert_refused("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400).await;
}

#[tokio::test]
async fn obs_fold_and_bare_lf_are_refused() {
    assert_refused("GET /x HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n", 400).await;
    assert_refused("GET /x HTTP/1.1\nHost: a\nX-A: b\n\n", 400).await;
    assert_refused("GET /x HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n", 400).await;
}

#[tokio::test]
async fn a_bad_second_request_on_a_keep_alive_connection_is_refused_after_the_first_is_answered() {
    let (origin, _dir, proxy) = setup("").await;
    let req = "GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\nHost: a\n\n";
    let reply = raw(proxy.local_addr(), req.as_bytes(), WAIT).await;
    let text = reply.text();
    assert_eq!(reply.status(), Some(200));
    let second = &text[text.find("HTTP/1.1 400").unwrap_or_else(|| panic!("no 400 in {text}"))..];
    assert!(second.contains(r#""detail":"ambiguous framing: a line of the request head ends in a bare LF""#), "{text}");
    assert!(reply.closed);
    let targets: Vec<String> = origin.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/first"]);
}

#[tokio::test]
async fn a_head_refused_by_the_parser_is_logged_with_its_status_and_reason() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.txt");
    let server = crate::support::process::serve_logging(origin.addr, &dir.path().join("cache"), &[], Some(&log)).await;
    let reply = raw(server.addr(), b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header: 1\r\n\r\n", WAIT).await;
    assert_eq!(reply.status(), Some(400));
    assert_json_error(&reply, "a header name with a space");
    let big = format!("GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(128 * 1024));
    assert_eq!(raw(server.addr(), big.as_bytes(), WAIT).await.status(), Some(431));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let rejected: Vec<&str> = text.lines().filter(|l| l.contains("request rejected")).collect();
    assert_eq!(rejected.len(), 2, "{text}");
    assert!(rejected[0].contains("malformed request head") && rejected[0].contains("status=400"), "{text}");
    assert!(rejected[1].contains("status=431") && rejected[1].contains("max_header_bytes"), "{text}");
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn invalid_chunk_sizes_are_refused() {
    assert_refused("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400)
        .await;
}

#[tokio::test]
async fn duplicate_host_and_a_mismatched_absolute_form_are_refused() {
    assert_refused("GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400).await;
    assert_refused("GET http://evil.example/x HTTP/1.1\r\nHost: a\r\n\r\n", 400).await;
}

#[tokio::test]
async fn oversized_header_blocks_and_uris_are_refused() {
    let big_header = format!("GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(128 * 1024));
    assert_refused(&big_header, 431).await;
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(128 * 1024));
    let (origin, _dir, proxy) = setup("").await;
    let reply = raw(proxy.local_addr(), long_uri.as_bytes(), WAIT).await;
    assert!(matches!(reply.status(), Some(414) | Some(431)), "got {:?}", reply.status());
    assert_json_error(&reply, "a 128 KiB URI");
    assert!(reply.closed);
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn a_request_hidden_in_a_body_never_reaches_the_origin() {
    let (origin, _dir, proxy) = setup("").await;
    let body = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let req = format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let reply = raw(proxy.local_addr(), req.as_bytes(), WAIT).await;
    assert_eq!(reply.status(), Some(200));
    assert_eq!(reply.responses(), 1);
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/upload");
    assert_eq!(seen[0].body, body.as_bytes(), "the body arrives as a body, with its own framing");
}

#[tokio::test]
async fn a_get_with_a_body_on_a_cache_route_is_refused() {
    let (origin, _dir, proxy) = setup("").await;
    let req = format!("GET {} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", batch("S-1"));
    let reply = raw(proxy.local_addr(), req.as_bytes(), WAIT).await;
    assert_eq!(reply.status(), Some(400));
    assert!(reply.text().contains("must not carry a body"));
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn path_confusion_never_stores_under_another_key() {
    let (origin, _dir, proxy) = setup("").await;
    let long = "a".repeat(129);
    for path in [
        "/download_batch_results/A/..%2fB".to_string(),
        "/download_batch_results/A;jsessionid=1".into(),
        "/download_batch_results/A%2F..%2FB".into(),
        "/download_batch_results/A%00".into(),
        "/download_batch_results/A/".into(),
        "/download_batch_results/%2e%2e".into(),
        format!("/download_batch_results/{long}"),
    ] {
        let got = get(proxy.local_addr(), &path).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(got.headers["content-type"], "application/json");
    }
    // Not the rule's exact prefix: passed through, never stored.
    let got = get(proxy.local_addr(), "//download_batch_results/A").await;
    assert!(got.headers.get("cache-status").is_none());
    assert!(proxy.store().is_empty());
    assert_eq!(origin.seen().iter().filter(|s| s.target.starts_with("/download_batch_results/")).count(), 0);
}

#[tokio::test]
async fn client_routing_and_forwarding_headers_never_reach_the_origin_as_sent() {
    let (origin, _dir, proxy) = setup("").await;
    let mut req = request(Method::GET, proxy.local_addr(), &batch("H-1"));
    for (k, v) in [
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "host=evil.example"),
        ("x-http-method-override", "DELETE"),
    ] {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    send(req).await;
    let seen = &origin.seen()[0];
    let header = |name: &str| seen.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    for dropped in ["x-original-url", "x-rewrite-url", "forwarded", "x-http-method-override"] {
        assert_eq!(header(dropped), None, "{dropped} reached the origin");
    }
    assert_eq!(header("x-forwarded-host").as_deref(), Some(proxy.local_addr().to_string().as_str()));
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
}

#[tokio::test]
async fn error_bodies_and_headers_never_echo_raw_control_characters() {
    let (_origin, _dir, proxy) = setup("").await;
    let reply = raw(
        proxy.local_addr(),
        b"GET /download_batch_results/A%0d%0aSet-Cookie:%20x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(reply.status(), Some(400));
    let text = reply.text();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(!head.to_ascii_lowercase().contains("set-cookie"), "{head}");
    assert!(!body.contains('\r') && !body.contains('\n'), "raw CR/LF in {body:?}");
    assert!(body.contains("\\r\\n"), "the id is shown escaped: {body}");
}

#[tokio::test]
async fn malformed_origin_responses_are_502_and_never_stored() {
    for (id, head) in [
        ("B-dup", "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nhello"),
        ("B-te", "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n"),
        ("B-fold", "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n c\r\n\r\nhello"),
    ] {
        let (origin, _dir, proxy) = setup("").await;
        origin.set(id, Behavior::RawResponse(head.as_bytes().to_vec()));
        let got = get(proxy.local_addr(), &batch(id)).await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{id}: {:?}", got.body);
        assert!(proxy.store().is_empty(), "{id}");
    }
}

#[tokio::test]
async fn a_slowloris_of_500_connections_leaves_the_proxy_serving_others() {
    let (_origin, _dir, proxy) = setup("").await;
    let mut loris = Vec::new();
    for _ in 0..500 {
        let mut s = tokio::net::TcpStream::connect(proxy.local_addr()).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Slow: ").await.unwrap();
        loris.push(s);
    }
    let started = std::time::Instant::now();
    let got = get(proxy.local_addr(), &batch("L-ok")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(2), "served in {:?}", started.elapsed());
    drop(loris);
}

#[tokio::test]
async fn connections_that_send_no_complete_head_are_closed_after_the_header_timeout() {
    let (_origin, _dir, proxy) = setup("").await;
    let addr = proxy.local_addr();
    // Config in tests: header_read_timeout default 10s is too long; this proxy uses 1s.
    drop(proxy);
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"\n[origin]\nurl = \"http://{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[cache]\ndir = \"{}\"\n",
        origin.addr,
        dir.path().display()
    );
    let config = lotecache::config::parse("t", &text, &Default::default()).unwrap();
    let proxy = lotecache::RunningProxy::start(config).await.unwrap();
    let _ = addr;
    let slow = raw(proxy.local_addr(), b"GET /x HTTP/1.1\r\nHost: a\r\n", Duration::from_secs(4)).await;
    assert!(slow.closed, "a half-sent head must not hold the connection");
    let idle = raw(proxy.local_addr(), b"", Duration::from_secs(4)).await;
    assert!(idle.closed, "an idle connection must be closed");
}

#[tokio::test]
async fn a_client_reading_one_byte_a_second_stalls_neither_the_fill_nor_others() {
    let (origin, _dir, proxy) = setup("replay_buffer = \"1MiB\"\n").await;
    origin.set("SL-6mb", Behavior::Ok { delay: Duration::from_millis(100), pieces: 6, gap: Duration::from_millis(20) });
    let mut slow = crate::support::raw::slow_reader(proxy.local_addr(), &batch("SL-6mb")).await;
    use tokio::io::AsyncReadExt;
    let reader = tokio::spawn(async move {
        let mut b = [0u8; 1];
        for _ in 0..3 {
            if slow.read(&mut b).await.unwrap_or(0) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let started = std::time::Instant::now();
    let fast = get(proxy.local_addr(), &batch("SL-6mb")).await;
    assert_eq!(fast.bytes(), &document("SL-6mb"));
    assert!(started.elapsed() < Duration::from_secs(3), "the fast client took {:?}", started.elapsed());
    assert!(proxy.store().get("SL-6mb_resultados.json").is_some(), "the fill completed");
    reader.abort();
}

fn with_cookie(
    proxy: std::net::SocketAddr,
    id: &str,
    cookie: &str,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = request(Method::GET, proxy, &batch(id));
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req
}

#[tokio::test]
async fn without_an_access_policy_requests_with_credentials_bypass_the_cache() {
    let (origin, _dir, proxy) = setup("").await;
    let p = proxy.local_addr();
    for _ in 0..2 {
        let got = send(with_cookie(p, "U-1", "session=alice")).await;
        assert_eq!(got.bytes(), &document("U-1"));
        assert_eq!(got.cache_status(), "lotecache; fwd=bypass; detail=credentials");
    }
    let mut auth = request(Method::GET, p, &batch("U-1"));
    auth.headers_mut().insert("authorization", "Bearer x".parse().unwrap());
    assert_eq!(send(auth).await.cache_status(), "lotecache; fwd=bypass; detail=credentials");
    assert!(proxy.store().is_empty());
    assert_eq!(origin.generations("U-1"), 3);
    // Without credentials the same batch is cached.
    assert_eq!(get(p, &batch("U-1")).await.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(get(p, &batch("U-1")).await.cache_status(), "lotecache; hit");
    // ...and a credentialed request still never gets the stored copy.
    assert_eq!(
        send(with_cookie(p, "U-1", "session=bob")).await.cache_status(),
        "lotecache; fwd=bypass; detail=credentials"
    );
}

#[tokio::test]
async fn a_public_route_serves_stored_batches_to_requests_with_credentials() {
    let rule = "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{lote_id}\"\naccess = \"public\"\n";
    let (origin, _dir, proxy) = setup(rule).await;
    send(with_cookie(proxy.local_addr(), "U-2", "session=alice")).await;
    let got = send(with_cookie(proxy.local_addr(), "U-2", "session=bob")).await;
    assert_eq!(got.cache_status(), "lotecache; hit");
    assert_eq!(origin.generations("U-2"), 1);
}

#[tokio::test]
async fn with_an_auth_check_a_hit_is_served_only_to_whom_the_backend_allows() {
    let (origin, _dir, proxy) = {
        let origin = TestOrigin::start().await;
        let dir = tempfile::tempdir().unwrap();
        // The check URL is a path: on the origin.
        let rule = "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{lote_id}\"\n[rules.auth]\nurl = \"/auth/{lote_id}\"\n";
        let proxy = start_proxy(origin.addr, dir.path(), rule).await;
        (origin, dir, proxy)
    };
    let p = proxy.local_addr();
    let allowed = send(with_cookie(p, "U-3", "user=ok")).await;
    assert_eq!(allowed.cache_status(), "lotecache; fwd=uri-miss");
    let hit = send(with_cookie(p, "U-3", "user=ok; theme=dark")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert_eq!(hit.bytes(), &document("U-3"));

    let refused = send(with_cookie(p, "U-3", "user=nope")).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["detail"], "no access to this batch", "the backend's answer, as it sent it");
    assert_eq!(refused.cache_status(), "lotecache; detail=access-denied");

    let anonymous = get(p, &batch("U-3")).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.headers["www-authenticate"], "Cookie realm=\"ocr\"");

    let checks: Vec<_> = origin.seen().into_iter().filter(|s| s.target.starts_with("/auth/")).collect();
    assert_eq!(checks.len(), 4, "one check per request, hits included");
    assert!(checks.iter().all(|c| c.target == "/auth/U-3"));
    assert!(checks.iter().all(|c| c.headers.iter().any(|(k, v)| k == "x-lote-id" && v == "U-3")));
    assert_eq!(origin.generations("U-3"), 1);
}

#[tokio::test]
async fn a_failing_auth_check_fails_closed() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let rule = format!(
        "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{{lote_id}}\"\n[rules.auth]\nurl = \"http://{closed}/auth/{{lote_id}}\"\ntimeout = \"1s\"\n"
    );
    let proxy = start_proxy(origin.addr, dir.path(), &rule).await;
    let got = send(with_cookie(proxy.local_addr(), "U-4", "user=ok")).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.json()["error"], "access check failed");
    assert_eq!(origin.generations("U-4"), 0);
}

#[tokio::test]
async fn a_route_may_store_despite_set_cookie_but_never_stores_the_cookie() {
    let rule =
        "[[rules]]\nname = \"b\"\npath = \"/download_batch_results/{lote_id}\"\nignore_response = [\"set-cookie\"]\n";
    let (origin, _dir, proxy) = setup(rule).await;
    origin.set("U-5", Behavior::WithHeaders(vec![("set-cookie".into(), "session=first-client".into())]));
    let miss = get(proxy.local_addr(), &batch("U-5")).await;
    assert_eq!(miss.cache_status(), "lotecache; fwd=uri-miss");
    assert_eq!(miss.headers["set-cookie"], "session=first-client", "the requester gets its own cookie");
    let hit = get(proxy.local_addr(), &batch("U-5")).await;
    assert_eq!(hit.cache_status(), "lotecache; hit");
    assert!(hit.headers.get("set-cookie").is_none(), "a stored cookie would be handed to everyone");
}

#[tokio::test]
async fn private_no_store_and_vary_cookie_responses_are_never_stored() {
    let (origin, _dir, proxy) = setup("").await;
    for (id, k, v, why) in [
        ("P-1", "cache-control", "private, max-age=60", "origin-private"),
        ("P-2", "cache-control", "no-store", "origin-no-store"),
        ("P-3", "vary", "Cookie", "vary"),
        ("P-4", "vary", "*", "vary"),
    ] {
        origin.set(id, Behavior::WithHeaders(vec![(k.into(), v.into())]));
        let got = get(proxy.local_addr(), &batch(id)).await;
        assert_eq!(got.cache_status(), format!("lotecache; fwd=uri-miss; detail={why}"), "{id}");
    }
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn client_input_never_reaches_a_log_line_raw() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.txt");
    let cache = dir.path().join("cache");
    let server = crate::support::process::serve_logging(origin.addr, &cache, &[], Some(&log)).await;
    let path = "/download_batch_results/A%0d%0aINJECTED%20fake%20log%20line";
    assert_eq!(get(server.addr(), path).await.status, StatusCode::BAD_REQUEST);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("request rejected"), "{text}");
    assert!(text.lines().all(|l| !l.starts_with("INJECTED")), "a client forged a log line:\n{text}");
    assert!(text.contains(r"A\r\nINJECTED"), "the id is logged escaped:\n{text}");
}
