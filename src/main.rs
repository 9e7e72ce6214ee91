//! The `lotecache` command: parses the command line and hands each command to the library
//! module that owns it. `serve` runs on the threads [`lotecache::server::runtime`] sets up: this
//! thread accepts and runs the admin side; each worker thread serves connections.

use clap::{Parser, Subcommand};
use lotecache::{cachectl, config, demo, logging, sample_origin, server};
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
        command: cachectl::cli::CacheCommand,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = (!matches!(cli.command, Command::Serve(_))).then(|| {
        logging::init(&logging::LogConfig { level: "info".into(), access: true, format: logging::LogFormat::Text })
    });
    let runtime = match &cli.command {
        // `serve` reads its config first: pinning decides how its runtime threads start.
        Command::Serve(args) => match config::load(args.config.as_deref(), &args.overrides()) {
            Ok(c) => server::runtime::runtime_builder(tokio::runtime::Builder::new_current_thread(), c.pin_workers),
            Err(errors) => return config::print_errors(&errors),
        },
        _ => server::runtime::runtime_builder(tokio::runtime::Builder::new_multi_thread(), false),
    }
    .build()
    .expect("tokio runtime");
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => server::serve_until_signal(args.config.clone(), args.overrides()).await,
            Command::CheckConfig { path } => match config::load(Some(&path), &config::Overrides::default()) {
                Ok(c) => {
                    c.notices.iter().for_each(|n| println!("warning: {n}"));
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Err(errors) => config::print_errors(&errors),
            },
            Command::Demo { listen, delay } => demo::run(listen, delay).await,
            Command::Cache { command } => cachectl::cli::run(command).await,
            Command::SampleOrigin { listen, delay } => match sample_origin::start(listen, delay).await {
                Ok(origin) => {
                    tracing::info!(listen = %origin.addr, ?delay, "sample origin serving");
                    server::wait_for_signal().await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lotecache sample-origin: cannot listen on {listen}: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}
