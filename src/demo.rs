//! The demo the README's first command runs: a miss then a hit, against the sample origin.

use crate::{config, sample_origin, RunningProxy};
use std::{process::ExitCode, time::Duration};

/// `lotecache demo`: starts the sample origin and the proxy in front of it (defaults, a
/// temporary cache directory), fetches one batch twice — a miss, then a hit — and prints both
/// with their `Cache-Status`, then serves until Ctrl-C and removes the directory.
pub async fn run(listen: String, delay: Duration) -> ExitCode {
    let origin = match sample_origin::start(([127, 0, 0, 1], 0).into(), delay).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("lotecache demo: cannot start the sample origin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cache_dir = std::env::temp_dir().join(format!("lotecache-demo-{}", std::process::id()));
    let overrides = config::Overrides {
        admin_listen: Some("127.0.0.1:0".into()),
        log_format: None,
        listen: Some(listen),
        origin: Some(format!("http://{}", origin.addr)),
        cache_dir: Some(cache_dir.display().to_string()),
        ..Default::default()
    };
    let config = match config::load(None, &overrides) {
        Ok(c) => c,
        Err(errors) => return config::print_errors(&errors),
    };
    let proxy = match RunningProxy::start(config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lotecache demo: {e} (try --listen 127.0.0.1:0)");
            return ExitCode::FAILURE;
        }
    };
    let url = format!("http://{}/download_batch_results/LOTE-DEMO-8mb", proxy.local_addr());
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut bodies = Vec::new();
    for label in ["first request (miss)", "second request (hit)"] {
        let started = std::time::Instant::now();
        let fetched = async {
            let resp = client.get(url.parse()?).await?;
            let cache_status =
                resp.headers().get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
            let body = http_body_util::BodyExt::collect(resp.into_body()).await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error>>((cache_status, body))
        }
        .await;
        match fetched {
            Ok((cs, body)) => {
                println!(
                    "{label:<22} {:>8.1} ms  {:>9} bytes  Cache-Status: {cs}",
                    started.elapsed().as_secs_f64() * 1e3,
                    body.len()
                );
                bodies.push(body);
            }
            Err(e) => {
                eprintln!("lotecache demo: {label} failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "bodies identical: {}   origin generations: {}",
        bodies[0] == bodies[1],
        origin.generations.get("LOTE-DEMO-8mb")
    );
    println!("\nproxy:  http://{}/download_batch_results/<lote_id>   (try {url})", proxy.local_addr());
    println!(
        "origin: http://{}/download_batch_results/<lote_id>   (ids ending in -256kb, -16mb… set the size)",
        origin.addr
    );
    println!("cache:  {}\nserving until Ctrl-C", cache_dir.display());
    crate::server::wait_for_signal().await;
    proxy.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&cache_dir);
    ExitCode::SUCCESS
}
