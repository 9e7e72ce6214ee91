//! Test servers on 127.0.0.1 ephemeral ports: a raw-TCP origin that counts generations and
//! misbehaves on demand, the proxy itself started in-process, and a small HTTP client.
#![allow(dead_code)]

pub mod origin;
pub mod process;
pub mod raw;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use lotecache::{config, RunningProxy};
use std::{net::SocketAddr, path::Path};

/// A test origin, a temporary cache directory and the proxy in front of it, with any extra
/// TOML appended to the proxy's config: the setup of most tests.
pub async fn setup(extra: &str) -> (origin::TestOrigin, tempfile::TempDir, RunningProxy) {
    let origin = origin::TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(origin.addr, dir.path(), extra).await;
    (origin, dir, proxy)
}

/// A request to the admin listener at `addr`, with a bearer `token` if given.
pub async fn admin(addr: SocketAddr, method: Method, path: &str, token: Option<&str>, body: &str) -> Got {
    let mut req = Request::builder().method(method).uri(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(req.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await
}

/// A `GET` on the admin listener, without a token.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Got {
    admin(addr, Method::GET, path, None, "").await
}

/// The value of one sample line of a Prometheus text exposition, if it is there.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
}

/// Starts the proxy in front of `origin` with the cache in `dir`, short timeouts, and any
/// extra TOML appended to its config.
pub async fn start_proxy(origin: SocketAddr, dir: &Path, extra_toml: &str) -> RunningProxy {
    start_proxy_admin(origin, dir, "", extra_toml).await
}

/// As [`start_proxy`], with extra lines for the `[admin]` section (e.g. a token).
pub async fn start_proxy_admin(origin: SocketAddr, dir: &Path, admin_toml: &str, extra_toml: &str) -> RunningProxy {
    start_proxy_with(origin, dir, "", admin_toml, extra_toml).await
}

/// As [`start_proxy`], with extra lines for the `[server]` and `[admin]` sections.
pub async fn start_proxy_with(
    origin: SocketAddr,
    dir: &Path,
    server_toml: &str,
    admin_toml: &str,
    extra_toml: &str,
) -> RunningProxy {
    // The scrubber stays off unless a test asks for it: it must not race tests that damage files.
    let scrub = if extra_toml.contains("scrub_rate") { "" } else { "scrub_rate = \"off\"\n" };
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_toml}\n\
         [origin]\nurl = \"http://{origin}\"\nresponse_timeout = \"2s\"\nbody_idle_timeout = \"1s\"\nconnect_timeout = \"1s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n{admin_toml}\n\
         [cache]\ndir = \"{}\"\n{scrub}{extra_toml}",
        dir.display()
    );
    let config = config::parse("test", &text, &config::Overrides::default()).expect("test config");
    RunningProxy::start(config).await.expect("proxy starts")
}

/// A response as the client saw it; `body` is `Err` when the body did not end cleanly.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Result<Bytes, String>,
}

impl Got {
    pub fn cache_status(&self) -> &str {
        self.headers.get("cache-status").map(|v| v.to_str().unwrap()).unwrap_or("")
    }
    pub fn bytes(&self) -> &Bytes {
        self.body.as_ref().expect("body ended cleanly")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.bytes()).expect("JSON body")
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http()
}

/// Sends `req` and reads the whole body.
pub async fn send(req: Request<Full<Bytes>>) -> Got {
    let resp = client().request(req).await.expect("response head");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).map_err(|e| format!("{e:?}"));
    Got { status: parts.status, headers: parts.headers, body }
}

pub async fn get(proxy: SocketAddr, path: &str) -> Got {
    send(request(Method::GET, proxy, path)).await
}

pub fn request(method: Method, proxy: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::builder().method(method).uri(format!("http://{proxy}{path}")).body(Full::new(Bytes::new())).unwrap()
}

/// The path of batch `id`'s results.
pub fn batch(id: &str) -> String {
    format!("/download_batch_results/{id}")
}

/// The `[[rules]]` part of the shipped `config/lotecache.toml`, to append to a test config.
pub fn shipped_rules() -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/lotecache.toml")).unwrap();
    text[text.find("\n[[rules]]").expect("the shipped config has rules") + 1..].to_string()
}

/// The integrity oracle: a `200` whose body ended cleanly must be exactly the batch's document.
pub fn assert_intact(got: &Got, id: &str) {
    if got.status == StatusCode::OK {
        if let Ok(body) = &got.body {
            assert!(body == &origin::document(id), "a clean 200 for {id} carried other bytes ({} bytes)", body.len());
        }
    }
}

/// Polls `cond` every 20 ms for up to `within`; whether it became true.
pub async fn wait_until(within: std::time::Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}

/// Waits (up to 60 s) until the proxy has no compression queued or running: the variants of
/// what it stored so far are built (or judged not worth keeping).
pub async fn compression_settled(proxy: &RunningProxy) {
    let settled = wait_until(std::time::Duration::from_secs(60), || proxy.cache().compressions_pending() == 0).await;
    assert!(settled, "compressions still pending after 60 s");
}
