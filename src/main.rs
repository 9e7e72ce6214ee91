//! The `lotecache` command: telemetry, configuration, serve until a signal, drain.

use clap::{Parser, Subcommand};
use lotecache::{config, sample_origin, RunningProxy};
use std::{path::PathBuf, process::ExitCode, time::Duration};

#[derive(Parser)]
#[command(name = "lotecache", version, about = "Caching reverse proxy for saved batch results")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// Offline operations on a cache directory.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Validate a config file: prints every error with its location, or "ok".
    CheckConfig { path: PathBuf },
    /// Run only the sample legacy origin (for benchmarks and trials): every
    /// `/download_batch_results/<id>` is regenerated after `--delay`; any other path returns
    /// generation counts as JSON.
    SampleOrigin {
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        delay: Duration,
    },
    /// Start a sample legacy origin and the proxy in front of it, show a miss then a hit.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = config::DEFAULT_LISTEN)]
        listen: String,
        /// Artificial generation time of the sample origin.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        delay: Duration,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Config file (TOML). Without it, built-in defaults apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (overrides the file).
    #[arg(long)]
    listen: Option<String>,
    /// Origin base URL, e.g. http://127.0.0.1:5000 (overrides the file).
    #[arg(long)]
    origin: Option<String>,
    /// Cache directory (overrides the file).
    #[arg(long)]
    cache_dir: Option<String>,
    /// Admin listener address, e.g. 127.0.0.1:9091 (overrides the file).
    #[arg(long)]
    admin_listen: Option<String>,
    /// Log format: text or json (overrides the file).
    #[arg(long)]
    log_format: Option<String>,
    /// Shared store for several replicas, s3://BUCKET[/prefix] (overrides the file);
    /// credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, region from AWS_REGION.
    #[arg(long, value_name = "s3://BUCKET[/prefix]")]
    shared_store: Option<String>,
    /// S3 endpoint URL, e.g. http://127.0.0.1:3900 (path-style); repeat it to list every
    /// node: a node that fails or does not answer in time is skipped (overrides the file).
    #[arg(long = "s3-endpoint", value_name = "URL")]
    s3_endpoints: Vec<String>,
}

impl ServeArgs {
    fn overrides(&self) -> config::Overrides {
        config::Overrides {
            listen: self.listen.clone(),
            origin: self.origin.clone(),
            cache_dir: self.cache_dir.clone(),
            admin_listen: self.admin_listen.clone(),
            log_format: self.log_format.clone(),
            shared_store: self.shared_store.clone(),
            s3_endpoints: self.s3_endpoints.clone(),
        }
    }
}

/// Where a `cache` command finds the store.
#[derive(clap::Args)]
struct StoreArgs {
    /// Cache directory.
    #[arg(long, conflicts_with = "config")]
    cache_dir: Option<PathBuf>,
    /// Take the cache directory from this config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

impl StoreArgs {
    fn dir(&self) -> Result<PathBuf, ExitCode> {
        if let Some(d) = &self.cache_dir {
            return Ok(d.clone());
        }
        match config::load(self.config.as_deref(), &config::Overrides::default()) {
            Ok(c) => Ok(c.cache_dir),
            Err(errors) => Err(print_config_errors(&errors)),
        }
    }
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List entries: key, lote id, size, stored at, digest.
    Ls {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Entries, bytes, content files, unreferenced content, temp files.
    Stats {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove entries by lote id, by key, or all (server stopped; while it runs use the
    /// admin API's POST /purge).
    Purge {
        #[command(flatten)]
        store: StoreArgs,
        /// The batch whose entries to remove.
        #[arg(required_unless_present_any = ["key", "all"])]
        lote_id: Option<String>,
        #[arg(long, conflicts_with_all = ["lote_id", "all"])]
        key: Option<String>,
        #[arg(long, conflicts_with_all = ["lote_id", "key"])]
        all: bool,
    },
    /// Remove content no entry references and compact the index (server stopped).
    Gc {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write every entry, verified, as <dir>/<lote_id>_resultados.json (atomically).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// Destination directory (created if missing).
        dir: PathBuf,
    },
    /// Request each batch listed in FILE (one id per line) through the proxy.
    Warm {
        /// File of lote ids, one per line ('#' comments and blank lines skipped).
        file: PathBuf,
        /// Base URL of the proxy, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        via: String,
        /// Requests at a time.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Path of a batch on the proxy.
        #[arg(long, default_value = config::DEFAULT_RULE_PATH)]
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every entry against its digest; exit 0 only if all are good.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// Remove the bad entries (the server must be stopped: this takes the directory lock).
        #[arg(long)]
        remove: bool,
    },
}

/// Logs to stderr through a background writer (request threads never wait on the
/// terminal or journald); `RUST_LOG` overrides the configured level. Keep the guard alive:
/// dropping it flushes what is queued.
fn init_logging(log: &config::LogConfig) -> tracing_appender::non_blocking::WorkerGuard {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    if !log.access {
        filter = filter.add_directive("lotecache::access=off".parse().expect("static directive"));
    }
    let (writer, guard) =
        tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(std::io::stderr());
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal(); // no colour codes in journald or files
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(lotecache::log_escape::Escaping::new(writer, ansi));
    match log.format {
        config::LogFormat::Json => builder.json().init(),
        config::LogFormat::Text => builder.init(),
    }
    guard
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = (!matches!(cli.command, Command::Serve(_))).then(|| {
        init_logging(&config::LogConfig { level: "info".into(), access: true, format: config::LogFormat::Text })
    });
    // `serve` reads its config first: it sizes the runtime.
    let (mut workers, mut pin_workers, mut worker_slice) = (0, false, std::time::Duration::ZERO);
    if let Command::Serve(args) = &cli.command {
        match config::load(args.config.as_deref(), &args.overrides()) {
            Ok(c) => (workers, pin_workers, worker_slice) = (c.workers, c.pin_workers, c.worker_slice),
            Err(errors) => return print_config_errors(&errors),
        }
    }
    if pin_workers {
        lotecache::worker_cpu::enable_pinning();
    }
    lotecache::worker_cpu::use_slice(worker_slice);
    // `serve`: this thread accepts and runs the admin side; each worker thread serves
    // connections on a runtime of its own. Anything else: one multi-threaded runtime.
    let (mut runtime, workers) = if matches!(cli.command, Command::Serve(_)) {
        let threads = if workers > 0 { workers } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
        (
            runtime_builder(tokio::runtime::Builder::new_current_thread(), pin_workers),
            WorkerThreads::start(threads, pin_workers),
        )
    } else {
        (runtime_builder(tokio::runtime::Builder::new_multi_thread(), pin_workers), WorkerThreads::default())
    };
    let runtime = runtime.build().expect("tokio runtime");
    let handles = workers.handles.clone();
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args.config.clone(), args.overrides(), handles).await,
            Command::CheckConfig { path } => match config::load(Some(&path), &config::Overrides::default()) {
                Ok(_) => {
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Err(errors) => print_config_errors(&errors),
            },
            Command::Demo { listen, delay } => demo(listen, delay).await,
            Command::Cache { command } => cache_command(command).await,
            Command::SampleOrigin { listen, delay } => match sample_origin::start(listen, delay).await {
                Ok(origin) => {
                    tracing::info!(listen = %origin.addr, ?delay, "sample origin serving");
                    wait_for_signal().await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lotecache sample-origin: cannot listen on {listen}: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    });
    workers.stop();
    code
}

fn print_config_errors(errors: &[config::ConfigError]) -> ExitCode {
    for e in errors {
        eprintln!("{e}");
    }
    eprintln!("{} error(s)", errors.len());
    ExitCode::FAILURE
}

/// Prints `value` as JSON, or `human` otherwise.
fn output(json: bool, value: &impl serde::Serialize, human: impl FnOnce()) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).expect("output serializes"));
    } else {
        human();
    }
}

async fn cache_command(command: CacheCommand) -> ExitCode {
    use lotecache::cachectl;
    use std::io::IsTerminal;
    let progress = |json: bool| !json && std::io::stderr().is_terminal();
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("lotecache cache {what}: {e}");
        ExitCode::from(2)
    };
    match command {
        CacheCommand::Ls { store } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            let entries = cachectl::ls(&dir);
            let list: Vec<_> = entries.iter().map(lotecache::admin::entry_json).collect();
            output(store.json, &list, || {
                println!("{:<48} {:<32} {:>12}  {:<24}  sha256", "key", "lote_id", "bytes", "stored at");
                for e in &list {
                    println!(
                        "{:<48} {:<32} {:>12}  {:<24}  {}",
                        e["key"].as_str().unwrap_or(""),
                        e["lote_id"].as_str().unwrap_or(""),
                        e["size"],
                        e["stored_at"].as_str().unwrap_or(""),
                        &e["sha256"].as_str().unwrap_or("")[..16]
                    );
                }
                println!("{} entries", list.len());
            });
            ExitCode::SUCCESS
        }
        CacheCommand::Stats { store } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            let s = cachectl::stats(&dir);
            output(store.json, &s, || {
                println!("store            {}", s.dir);
                println!("entries          {} ({} bytes)", s.entries, s.bytes);
                println!("content files    {} ({} bytes)", s.content_files, s.content_bytes);
                println!(
                    "unreferenced     {} ({} bytes; `cache gc` removes them)",
                    s.unreferenced_files, s.unreferenced_bytes
                );
                println!("temp files       {}", s.tmp_files);
            });
            ExitCode::SUCCESS
        }
        CacheCommand::Purge { store, lote_id, key, all } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            let which = match (lote_id, key, all) {
                (_, _, true) => lotecache::cache::store::Purge::All,
                (_, Some(k), _) => lotecache::cache::store::Purge::Key(k),
                (Some(id), _, _) => lotecache::cache::store::Purge::LoteId(id),
                _ => unreachable!("clap requires one of them"),
            };
            match cachectl::purge(&dir, which).await {
                Ok(removed) => {
                    output(store.json, &serde_json::json!({ "removed": removed }), || {
                        removed.iter().for_each(|k| println!("removed {k}"));
                        println!("{} entries removed", removed.len());
                    });
                    ExitCode::SUCCESS
                }
                Err(e) => fail(
                    "purge",
                    &format!("{e}\n(while the server runs, purge through its admin API: curl -X POST -H 'Authorization: Bearer $TOKEN' http://127.0.0.1:9091/purge -d '{{\"lote_id\":\"...\"}}')"),
                ),
            }
        }
        CacheCommand::Gc { store } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            match cachectl::gc(&dir).await {
                Ok(r) => {
                    output(store.json, &r, || {
                        println!(
                            "removed {} unreferenced content files ({} bytes), compacted {} index buckets",
                            r.removed_files, r.removed_bytes, r.compacted_buckets
                        )
                    });
                    ExitCode::SUCCESS
                }
                Err(e) => fail("gc", &e),
            }
        }
        CacheCommand::Export { store, dir: out } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            match cachectl::export(&dir, &out, progress(store.json)).await {
                Ok(r) => {
                    output(store.json, &r, || {
                        for b in &r.bad {
                            println!("  BAD  {} (lote {}): {} — not exported", b.key, b.lote_id, b.reason);
                        }
                        println!("exported {} files to {}, {} bad", r.exported.len(), r.dir, r.bad.len());
                    });
                    if r.bad.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail("export", &e),
            }
        }
        CacheCommand::Warm { file, via, concurrency, path, json } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => return fail("warm", &format!("cannot read {}: {e}", file.display())),
            };
            let ids: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect();
            let r = cachectl::warm(ids, &via, &path, concurrency, progress(json)).await;
            output(json, &r, || {
                r.failed.iter().for_each(|f| println!("  FAILED {f}"));
                println!(
                    "{} requested: {} hits, {} stored, {} not stored, {} failed",
                    r.requested,
                    r.hit,
                    r.stored,
                    r.not_stored,
                    r.failed.len()
                );
            });
            if r.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        CacheCommand::Verify { store, remove } => cache_verify(store, remove).await,
    }
}

async fn cache_verify(args: StoreArgs, remove: bool) -> ExitCode {
    let dir = match args.dir() {
        Ok(d) => d,
        Err(code) => return code,
    };
    use std::io::IsTerminal;
    let progress = !args.json && std::io::stderr().is_terminal();
    let report = match lotecache::cachectl::verify(&dir, remove, progress).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lotecache cache verify: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        println!("verified {} entries ({} bytes) in {}", report.checked, report.bytes, report.dir);
        for b in &report.bad {
            println!("  BAD  {} (lote {}): {}", b.key, b.lote_id, b.reason);
        }
        if report.unreadable > 0 {
            println!("  {} index line(s) could not be read", report.unreadable);
        }
        let removed = if remove { format!(", {} removed", report.removed) } else { String::new() };
        println!("{} good, {} bad{removed}", report.checked - report.bad.len(), report.bad.len());
    }
    if report.all_good() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A runtime builder with what every runtime thread needs: the process's core mask back for
/// threads a pinned worker starts, and the yield clock restarted when a worker sleeps.
fn runtime_builder(mut builder: tokio::runtime::Builder, pin_workers: bool) -> tokio::runtime::Builder {
    builder
        .enable_all()
        .thread_name("tokio-rt-worker")
        .on_thread_park(lotecache::worker_cpu::parked)
        .on_thread_unpark(lotecache::worker_cpu::unparked);
    if pin_workers {
        builder.on_thread_start(lotecache::worker_cpu::on_thread_start);
    }
    builder
}

/// Keeps a timer due within half a second, forever. Every request sets timers further out
/// (`server.header_read_timeout`, `origin.response_timeout`); tokio wakes its own driver
/// (an eventfd write, then one more `epoll_wait`) whenever a new timer is due before every other
/// one, which on an idle worker was twice per request. With this one always due first, that
/// happens twice a second instead.
async fn keep_a_timer_set() {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `serve`'s worker threads, each running a single-threaded runtime until stopped.
#[derive(Default)]
struct WorkerThreads {
    handles: lotecache::server::Workers,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl WorkerThreads {
    fn start(count: usize, pin_workers: bool) -> WorkerThreads {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for slot in 1..=count {
            let runtime = runtime_builder(tokio::runtime::Builder::new_current_thread(), pin_workers)
                .build()
                .expect("worker runtime");
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            let thread = std::thread::Builder::new().name("tokio-rt-worker".into()).spawn(move || {
                lotecache::upstream::use_pool_slot(slot);
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stopped.wait_for(|stop| *stop) => {}
                        _ = keep_a_timer_set() => {}
                    }
                });
            });
            threads.push(thread.expect("worker thread"));
        }
        WorkerThreads { handles: handles.into(), stop: Some(stop), threads }
    }

    /// Ends the worker runtimes (after the proxy's own graceful shutdown) and waits for them.
    fn stop(self) {
        if let Some(stop) = self.stop {
            let _ = stop.send(true);
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

async fn serve(path: Option<PathBuf>, overrides: config::Overrides, workers: lotecache::server::Workers) -> ExitCode {
    let config = match config::load(path.as_deref(), &overrides) {
        Ok(c) => c,
        Err(errors) => return print_config_errors(&errors),
    };
    let _log_guard = init_logging(&config.log);
    let proxy = match RunningProxy::start_with_workers(config, workers).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lotecache: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = wait_for_signal() => break,
            _ = hup.recv() => match config::load(path.as_deref(), &overrides) {
                Ok(new) => proxy.reload(new),
                Err(errors) => {
                    for e in &errors {
                        tracing::error!(error = %e, "config reload rejected");
                    }
                    tracing::error!(errors = errors.len(), "invalid config file; keeping the running configuration");
                }
            },
        }
    }
    tracing::info!("shutting down: no new connections, finishing responses and fills");
    proxy.shutdown(Duration::from_secs(30)).await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn demo(listen: String, delay: Duration) -> ExitCode {
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
        Err(errors) => return print_config_errors(&errors),
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
    wait_for_signal().await;
    proxy.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&cache_dir);
    ExitCode::SUCCESS
}
