//! Requests no rule caches are forwarded transparently.

use crate::support::{origin::*, send, start_proxy, start_proxy_with};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test]
async fn pass_through_keeps_method_query_headers_and_bodies() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    let upload: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let req = Request::put(format!("http://{}/api/lotes/7?estado=en_proceso&x=%20y", proxy.local_addr()))
        .header("x-custom", "uno")
        .header("authorization", "Bearer t0ken")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .body(Full::new(Bytes::from(upload.clone())))
        .unwrap();
    let got = send(req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["x-origin"], "echo");
    assert_eq!(got.headers["via"], "1.1 lotecache");
    assert!(got.headers.get("cache-status").is_none());

    let seen = &origin.seen()[0];
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.target, "/api/lotes/7?estado=en_proceso&x=%20y");
    assert_eq!(seen.body, upload);
    let header = |name: &str| seen.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(header("x-custom").as_deref(), Some("uno"));
    assert_eq!(header("authorization").as_deref(), Some("Bearer t0ken"));
    assert_eq!(header("x-hop"), None);
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(header("via").as_deref(), Some("1.1 lotecache"));
    // The echo carries the body back: the response direction streams too.
    assert_eq!(got.json()["body"].as_str().unwrap().len(), 3_000_000);
}

#[tokio::test]
async fn origin_statuses_on_pass_through_are_returned_as_sent() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), "").await;
    origin.set("P-1", Behavior::Status(503));
    // POST on the batch path is not a cache method: it passes through.
    let req = Request::post(format!("http://{}/download_batch_results/P-1", proxy.local_addr()))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let got = send(req).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(got.headers.get("cache-status").is_none());
    assert!(proxy.store().is_empty());
}

#[tokio::test]
async fn keep_alive_origin_connections_are_reused_between_requests() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    // One worker: each worker keeps its own pool (two workers would each open one).
    let proxy = start_proxy_with(origin.addr, dir.path(), "workers = 1", "", "").await;
    for i in 0..5 {
        let got = crate::support::get(proxy.local_addr(), &format!("/api/lotes/{i}")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.json()["target"], format!("/api/lotes/{i}"));
    }
    assert_eq!(origin.connections(), 1, "one pooled origin connection served all five");
}

/// An origin that answers one request per connection and says so (`Connection: close`), then
/// waits for the proxy to close before it takes the next connection, as the legacy app's
/// gunicorn sync workers do. Returns its address and, per connection, how long it waited.
async fn one_request_per_connection_origin() -> (std::net::SocketAddr, Arc<Mutex<Vec<Duration>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let waits: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let w = waits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("served {}", w.lock().unwrap().len());
            let answer =
                format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            stream.write_all(answer.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            let answered = Instant::now();
            // Lingering close: one worker, so the next connection waits for this FIN.
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
            w.lock().unwrap().push(answered.elapsed());
        }
    });
    (addr, waits)
}

#[tokio::test]
async fn an_origin_ending_every_connection_gets_each_closed_once_its_answer_is_sent() {
    let (origin, waits) = one_request_per_connection_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin, dir.path(), "").await;
    // One keep-alive client connection for every request: the origin's close is not the client's.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    for i in 0..20 {
        let uri = format!("http://{}/monitoreo", proxy.local_addr());
        let resp = client.request(Request::get(uri).body(Full::new(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("connection").is_none(), "the origin's Connection header is hop-by-hop");
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        assert_eq!(body, format!("served {i}"));
    }
    let closed = crate::support::wait_until(Duration::from_secs(5), || waits.lock().unwrap().len() == 20).await;
    let waits = waits.lock().unwrap().clone();
    assert!(closed, "every origin connection closed: {} of 20", waits.len());
    // The close comes right after the client's answer is written, not when the client next
    // writes or leaves (the origin's worker would sit blocked until then).
    assert!(waits.iter().all(|w| *w < Duration::from_millis(500)), "{waits:?}");
}

#[tokio::test]
async fn a_pooled_connection_the_origin_closed_while_idle_is_replaced_without_an_error() {
    // Keep-alive answers, but each connection is closed 50 ms after its answer.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin, dir.path(), "").await;
    for _ in 0..3 {
        let got = crate::support::get(proxy.local_addr(), "/api/ping").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.bytes().as_ref(), b"ok");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_head_whose_body_comes_late_reaches_the_client_before_that_body() {
    // The origin sends its head, then holds the body until the client has the head: a proxy
    // that waited for the body before passing the head on would never finish this exchange.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let head_seen = Arc::new(tokio::sync::Notify::new());
    let release = head_seen.clone();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").await.unwrap();
        release.notified().await;
        stream.write_all(b"later").await.unwrap();
        let _ = stream.read(&mut buf).await;
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin, dir.path(), "").await;
    let mut client = tokio::net::TcpStream::connect(proxy.local_addr()).await.unwrap();
    client.write_all(b"GET /api/stream HTTP/1.1\r\nHost: lotes\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let within = Duration::from_secs(10);
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(within, client.read(&mut buf)).await.expect("the head arrives alone").unwrap();
        assert!(n > 0, "connection closed before the head");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&got));
    head_seen.notify_one();
    while !got.ends_with(b"later") {
        let n = tokio::time::timeout(within, client.read(&mut buf)).await.expect("the body follows").unwrap();
        assert!(n > 0, "connection closed before the body");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("\r\ncontent-length: 5\r\n"), "{text}");
}

#[tokio::test]
async fn a_pass_through_request_the_origin_never_answers_gets_504_at_the_response_timeout_not_the_connect_one() {
    // An origin that accepts every connection and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut silent = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            silent.push(conn);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    // The support config: connect_timeout 1 s, response_timeout 2 s.
    let proxy = start_proxy(addr, dir.path(), "").await;
    let started = Instant::now();
    let got = crate::support::get(proxy.local_addr(), "/monitoreo").await;
    let waited = started.elapsed();
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(got.headers["content-type"], "application/json");
    assert_eq!(got.json()["error"], "origin timed out");
    // Connected at once, the wait runs to the response's deadline, past the connect timeout's.
    assert!(waited >= Duration::from_millis(1950), "answered after {waited:?}");
}
