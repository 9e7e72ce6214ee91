//! What a proxy hop adds to one request, measured with the drift cancelled: requests go to the
//! targets one at a time, interleaved request by request in a fresh random order each cycle, so
//! whatever slows the machine down for a while (the origin's own time on this machine moves by
//! a third between runs a minute apart) falls on every target alike. oha, one target after
//! another, cannot separate a 5 % hop from that drift on a page of a few milliseconds.
//!
//! cargo run --release --example hop_latency -- --requests 2000 --path /monitoreo \
//!     origin=127.0.0.1:8000 nginx=127.0.0.1:8081 lotecache=127.0.0.1:8080
//!
//! The first target is the reference (the origin directly). Each target keeps one keep-alive
//! connection and opens a new one when the server closed it (as gunicorn's sync workers do after
//! every response); the connect is part of that request's time, as it is for oha. Prints one
//! tab-separated line per target: label, requests, p50 µs, p90 µs, p50 over the reference µs,
//! and that as a percentage. Loopback only; bounded by `--requests`.

use clap::Parser;
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

#[derive(Parser)]
struct Args {
    /// Requests per target.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Warm-up requests per target, not counted.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    #[arg(long, default_value = "/")]
    path: String,
    /// `label=host:port`, the reference first.
    #[arg(required = true, num_args = 1..)]
    targets: Vec<String>,
}

struct Target {
    label: String,
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    micros: Vec<f64>,
}

impl Target {
    /// One GET; returns whether the server keeps the connection.
    fn get(&mut self, request: &[u8]) -> std::io::Result<()> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let s = TcpStream::connect(self.addr)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                BufReader::with_capacity(64 * 1024, s)
            }
        };
        conn.get_mut().write_all(request)?;
        let mut line = String::new();
        conn.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("{}: {}", self.label, line.trim_end())));
        }
        let (mut length, mut close) = (None, false);
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("head cut short"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').unwrap_or((l, ""));
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<u64>().ok();
            } else if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close") {
                close = true;
            }
        }
        let length = length.ok_or_else(|| std::io::Error::other("no content-length"))?;
        let read = std::io::copy(&mut (&mut conn).take(length), &mut std::io::sink())?;
        if read != length {
            return Err(std::io::Error::other("body cut short"));
        }
        if !close {
            self.conn = Some(conn);
        }
        Ok(())
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut targets: Vec<Target> = args
        .targets
        .iter()
        .map(|t| {
            let (label, addr) = t.split_once('=').expect("targets are label=host:port");
            let addr: SocketAddr = addr.parse().expect("a loopback host:port");
            assert!(addr.ip().is_loopback(), "loopback only");
            Target { label: label.to_string(), addr, conn: None, micros: Vec::with_capacity(args.requests) }
        })
        .collect();
    let request =
        format!("GET {} HTTP/1.1\r\nHost: bench\r\nUser-Agent: hop_latency\r\nAccept: */*\r\n\r\n", args.path);
    let mut order: Vec<usize> = (0..targets.len()).collect();
    // xorshift: a fresh order each cycle without another dependency.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    for cycle in 0..args.warmup + args.requests {
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        for &i in &order {
            let t = &mut targets[i];
            let started = Instant::now();
            t.get(request.as_bytes())?;
            if cycle >= args.warmup {
                t.micros.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    let mut reference = None;
    for t in &mut targets {
        t.micros.sort_by(f64::total_cmp);
        let (p50, p90) = (percentile(&t.micros, 0.5), percentile(&t.micros, 0.9));
        let base = *reference.get_or_insert(p50);
        println!(
            "{}\t{}\t{:.0}\t{:.0}\t{:+.0}\t{:+.1}",
            t.label,
            t.micros.len(),
            p50,
            p90,
            p50 - base,
            (p50 / base - 1.0) * 100.0
        );
    }
    Ok(())
}
