//! Cold-miss benchmark: N clients, each on its own pre-opened connection, request the same
//! never-seen batch at the same instant. Reports origin generations (from the sample
//! origin's counters) and latency percentiles. Used by `bench/coldmiss.sh`.
//!
//! cargo run --release --example coldmiss -- --proxy http://127.0.0.1:8080 --origin http://127.0.0.1:5000 [-n 100]

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::{sync::Arc, time::Instant};

#[derive(Parser)]
struct Args {
    /// Base URL of the cache under test.
    #[arg(long)]
    proxy: String,
    /// Base URL of the sample origin (its counters tell the generations).
    #[arg(long)]
    origin: String,
    /// Simultaneous requests.
    #[arg(short, default_value_t = 100)]
    n: usize,
    /// Batch id (default: a fresh one).
    #[arg(long)]
    id: Option<String>,
    /// Label for the result line.
    #[arg(long, default_value = "lotecache")]
    label: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let id = args.id.unwrap_or_else(|| format!("COLD-{}", std::process::id()));
    let proxy: http::Uri = args.proxy.parse()?;
    let authority = proxy.authority().ok_or("proxy URL needs host:port")?.clone();
    let before = generations(&args.origin, &id).await?;

    let mut senders = Vec::with_capacity(args.n);
    for _ in 0..args.n {
        let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        senders.push(sender);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(args.n + 1));
    let path = format!("/download_batch_results/{id}");
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let (barrier, path, host) = (barrier.clone(), path.clone(), authority.to_string());
            tokio::spawn(async move {
                let req = http::Request::get(path).header("host", host).body(Empty::new()).unwrap();
                barrier.wait().await;
                let start = Instant::now();
                let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                let ok = resp.status() == 200;
                let len = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes().len();
                Ok::<_, String>((start.elapsed(), ok && len > 0))
            })
        })
        .collect();
    barrier.wait().await;
    let mut lat = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await? {
            Ok((d, true)) => lat.push(d.as_secs_f64() * 1e3),
            _ => failed += 1,
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat.get(((lat.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(f64::NAN);
    let gens = generations(&args.origin, &id).await? - before;
    println!(
        "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
        args.label,
        args.n,
        gens,
        failed,
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

/// Generations of `id` so far, from the sample origin's counters.
async fn generations(origin: &str, id: &str) -> Result<u64, Box<dyn std::error::Error>> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = client.get(format!("{origin}/__stats").parse()?).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(v["by_id"][id].as_u64().unwrap_or(0))
}
