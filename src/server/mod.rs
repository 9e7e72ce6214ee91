//! Building the proxy from a `Config` and running it: the worker runtimes ([`runtime`]), the
//! proxy and admin listeners, one HTTP/1.1 connection task per client on the worker it is handed
//! to (its socket wrapped in [`client_io::ClientIo`]), the periodic garbage collector, hot
//! reload, and graceful shutdown. Tests start it in-process on `127.0.0.1:0`, with the same
//! threads `lotecache serve` runs.

pub mod client_io;
pub mod parser_answer;
pub mod runtime;

use crate::admin::Admin;
use crate::body::ProxyBody;
use crate::cache::{shared::SharedStore, store::Store, Cache};
use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::origin::Origin;
use crate::pool::AfterAnswer;
use crate::proxy::{ProxyService, ProxyState};
use crate::rules::Rules;
use arc_swap::ArcSwap;
use client_io::ClientIo;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use runtime::{WorkerThreads, Workers};
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the cache directory: {0}")]
    Store(#[from] crate::cache::store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Shared(#[from] crate::cache::shared::SharedSetupError),
}

/// A running proxy.
pub struct RunningProxy {
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
    state: Arc<ProxyState>,
    admin: Arc<Admin>,
    config: Mutex<Config>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The threads connections are served on (stopped, dropping what runs on them, when this
    /// is dropped).
    workers: WorkerThreads,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })
}

impl RunningProxy {
    /// Opens the store, starts the worker threads (`server.workers`), binds the listeners and
    /// starts serving. This runtime accepts, and runs the admin listener and the background
    /// loops; proxy connections run on the workers.
    pub async fn start(config: Config) -> Result<RunningProxy, StartError> {
        for notice in &config.notices {
            tracing::warn!(notice = %notice, "config");
        }
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(config.cache_dir.clone(), config.max_size, metrics.clone()).await?;
        store.set_gc_grace(config.gc_grace);
        store.set_memory_tier(config.memory_tier, config.memory_object_max, config.memory_recheck);
        store.set_min_free(config.min_free);
        let origin = Origin::new(config.origin.clone(), metrics.clone());
        let shared_store = match &config.shared {
            Some(c) => Some((SharedStore::new(c, metrics.clone())?, c.probe_interval)),
            None => None,
        };
        let cache = Cache::new(store.clone(), origin.clone(), config.fill.clone());
        if let Some((s, _)) = &shared_store {
            cache.fills.set_shared(s.clone());
        }
        let state = Arc::new(ProxyState {
            rules: ArcSwap::from_pointee(Rules::new(config.rules.clone())),
            cache,
            origin,
            metrics,
        });
        let listener = bind(config.listen).await?;
        let admin_listener = bind(config.admin.listen).await?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let admin_addr =
            admin_listener.local_addr().map_err(|source| StartError::Listen { addr: config.admin.listen, source })?;
        let admin = Admin::new(state.clone(), config.admin.token.clone());
        let (stop, stopped) = watch::channel(false);

        let proxy_state = state.clone();
        let limits = Limits {
            header_read_timeout: config.header_read_timeout,
            max_header_bytes: config.max_header_bytes,
            max_connections: config.max_connections,
            send_buffer: config.send_buffer,
        };
        let workers = WorkerThreads::start(runtime::worker_count(config.workers), config.pin_workers);
        let proxy_task = tokio::spawn(accept_loop(
            listener,
            limits,
            stopped.clone(),
            workers.handles(),
            move |peer, after, written| {
                TowerToHyperService::new(ProxyService::new(proxy_state.clone(), peer, after, written))
            },
        ));
        let admin_state = admin.clone();
        // The admin port serves operators and probes: a few connections are plenty.
        let admin_limits = Limits { max_connections: 64, send_buffer: 0, ..limits };
        let admin_task =
            tokio::spawn(accept_loop(admin_listener, admin_limits, stopped.clone(), Arc::new([]), move |_, _, _| {
                let admin = admin_state.clone();
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                })
            }));
        let scrub_task =
            tokio::spawn(crate::cache::read::scrub_loop(store.clone(), config.scrub_rate, stopped.clone()));
        let mut tasks = vec![proxy_task, admin_task, scrub_task];
        if let Some((s, interval)) = shared_store {
            tracing::info!(store = %s.location(), "shared store configured");
            tasks.push(tokio::spawn(probe_loop(s, interval, stopped.clone())));
        }
        tasks.push(tokio::spawn(gc_loop(store, config.gc_interval, stopped)));
        tracing::info!(
            listen = %local_addr, admin = %admin_addr, origin = %config.origin.authority,
            cache_dir = %config.cache_dir.display(), rules = config.rules.len(), "lotecache serving"
        );
        Ok(RunningProxy { local_addr, admin_addr, state, admin, config: Mutex::new(config), stop, tasks, workers })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The store (tests and tools inspect it).
    pub fn store(&self) -> &Arc<Store> {
        &self.state.cache.store
    }

    /// The cache: store and fills in flight.
    pub fn cache(&self) -> &Cache {
        &self.state.cache
    }

    /// Applies a new configuration without dropping connections: rules, fill limits,
    /// `max_size`, GC grace, the memory tier and the admin token change at once; listeners and
    /// their limits, the workers (count, pinning), the cache directory and the
    /// origin need a restart (a warning says which).
    pub fn reload(&self, new: Config) {
        let mut current = self.config.lock().expect("config lock");
        let needs_restart = [
            ("server.listen", current.listen != new.listen),
            ("server.header_read_timeout", current.header_read_timeout != new.header_read_timeout),
            ("server.max_header_bytes", current.max_header_bytes != new.max_header_bytes),
            ("server.max_connections", current.max_connections != new.max_connections),
            ("server.send_buffer", current.send_buffer != new.send_buffer),
            ("server.workers", current.workers != new.workers),
            ("server.pin_workers", current.pin_workers != new.pin_workers),
            ("admin.listen", current.admin.listen != new.admin.listen),
            ("cache.dir", current.cache_dir != new.cache_dir),
            ("origin", format!("{:?}", current.origin) != format!("{:?}", new.origin)),
            ("shared", current.shared != new.shared),
            ("cache.max_fills", current.fill.max_fills != new.fill.max_fills),
            ("cache.max_fills_per_worker", current.fill.max_fills_per_worker != new.fill.max_fills_per_worker),
        ];
        for notice in &new.notices {
            tracing::warn!(notice = %notice, "config");
        }
        for (field, changed) in needs_restart {
            if changed {
                tracing::warn!(field, "changed in the config file; takes effect after a restart");
            }
        }
        self.state.rules.store(Arc::new(Rules::new(new.rules.clone())));
        self.state.cache.fills.set_config(new.fill.clone());
        self.state.cache.store.set_max_size(new.max_size);
        self.state.cache.store.set_min_free(new.min_free);
        self.state.cache.store.set_gc_grace(new.gc_grace);
        self.state.cache.store.set_memory_tier(new.memory_tier, new.memory_object_max, new.memory_recheck);
        self.admin.set_token(new.admin.token.clone());
        tracing::info!(rules = new.rules.len(), "configuration reloaded");
        *current = new;
    }

    /// Stops accepting, lets open responses and fills finish for up to `grace`, then aborts
    /// what is left (an aborted fill deletes its temp file).
    pub async fn shutdown(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        let _ = self.stop.send(true);
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
        let fills = &self.state.cache.fills;
        while !fills.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !fills.is_empty() {
            tracing::warn!(fills = fills.len(), ?grace, "fills still running after the grace period; aborting them");
            fills.abort_all();
            for _ in 0..100 {
                if fills.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if let Some(s) = fills.shared() {
            s.drain(deadline.saturating_duration_since(tokio::time::Instant::now())).await;
        }
        self.state.cache.stop_background().await;
        self.workers.stop().await;
        tracing::info!("stopped");
    }
}

/// `lotecache serve`: loads the config, starts the proxy, reloads on `SIGHUP`, and on `SIGTERM`
/// or Ctrl-C stops accepting and drains for up to 30 s.
pub async fn serve_until_signal(path: Option<PathBuf>, overrides: config::Overrides) -> ExitCode {
    let config = match config::load(path.as_deref(), &overrides) {
        Ok(c) => c,
        Err(errors) => return config::print_errors(&errors),
    };
    let _log_guard = crate::logging::init(&config.log);
    let proxy = match RunningProxy::start(config).await {
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

/// Waits for `SIGTERM` or Ctrl-C.
pub async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Probes the shared store every `interval` (a failed request marks it down at once; this
/// notices when it is back, and keeps `/readyz` current when no traffic touches it).
async fn probe_loop(shared: Arc<SharedStore>, interval: Duration, mut stopped: watch::Receiver<bool>) {
    loop {
        shared.probe().await;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped.changed() => return,
        }
    }
}

/// Per-listener limits.
#[derive(Clone, Copy)]
struct Limits {
    header_read_timeout: Duration,
    max_header_bytes: usize,
    max_connections: usize,
    /// `SO_SNDBUF` for accepted connections; 0 leaves the kernel's autotuning.
    send_buffer: usize,
}

/// Accepts connections until `stopped`, then lets open connections finish. At most
/// `max_connections` are served at once: past that, new ones wait in the listen backlog. Each
/// connection is served on the next of `workers` in turn (none: here).
async fn accept_loop<M, S, F>(
    listener: TcpListener,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
    workers: Workers,
    make_service: M,
) where
    M: Fn(SocketAddr, Arc<AfterAnswer>, Arc<crate::access_log::Written>) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible, Future = F>
        + Send
        + 'static,
    F: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut next_worker = 0;
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stopped.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let after = Arc::new(AfterAnswer::default());
                let written = Arc::new(crate::access_log::Written::default());
                let conn = Conn {
                    service: make_service(peer, after.clone(), written.clone()),
                    after,
                    written,
                    builder: builder.clone(),
                    limits,
                    watcher: graceful.watcher(),
                    permit,
                    peer,
                };
                let Some(worker) = workers.get(next_worker % workers.len().max(1)) else {
                    tokio::spawn(conn.serve(stream));
                    continue;
                };
                next_worker += 1;
                // A socket belongs to the runtime it is registered with: moved as a plain one.
                match stream.into_std() {
                    Ok(stream) => {
                        worker.spawn(async move {
                            match tokio::net::TcpStream::from_std(stream) {
                                Ok(stream) => conn.serve(stream).await,
                                Err(e) => tracing::warn!(%peer, error = %e, "cannot hand the connection to a worker"),
                            }
                        });
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot hand the connection to a worker"),
                }
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// An accepted connection with what serving it takes.
struct Conn<S> {
    service: S,
    after: Arc<AfterAnswer>,
    /// What the socket accepted, for the access log.
    written: Arc<crate::access_log::Written>,
    builder: http1::Builder,
    limits: Limits,
    watcher: hyper_util::server::graceful::Watcher,
    /// The connection's slot under `max_connections`.
    permit: tokio::sync::OwnedSemaphorePermit,
    peer: SocketAddr,
}

impl<S, F> Conn<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible, Future = F>,
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    async fn serve(self, stream: tokio::net::TcpStream) {
        let _ = stream.set_nodelay(true);
        if self.limits.send_buffer > 0 {
            set_send_buffer(&stream, self.limits.send_buffer);
        }
        let io = TokioIo::new(
            ClientIo::new(stream, self.limits.max_header_bytes)
                .with_after_answer(self.after)
                .with_written(self.written),
        );
        if let Err(e) = self.watcher.watch(self.builder.serve_connection(io, self.service)).await {
            tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
        }
        drop(self.permit);
    }
}

/// Fixes a connection's send buffer. With the kernel's autotuning, on a fast link each of many
/// large downloads grows its buffer to megabytes and the one that filled its socket keeps
/// getting served first; a fixed buffer shares the bandwidth out evenly (the 16 MB benchmark's
/// p99 halved, its req/s rose by half). Small answers fit in it whole either way.
fn set_send_buffer(stream: &tokio::net::TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket descriptor, and a pointer to a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "SO_SNDBUF not set");
    }
}

/// Runs the garbage collector every `interval` until stopped.
async fn gc_loop(store: Arc<Store>, interval: Duration, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {
                // Until the index is loaded the collector cannot tell what is live: next time.
                if !store.is_loaded() {
                    continue;
                }
                if let Err(e) = store.gc().await {
                    tracing::warn!(error = %e, "garbage collection failed");
                }
            }
            _ = stopped.changed() => return,
        }
    }
}
