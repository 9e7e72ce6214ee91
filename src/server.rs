//! Building the proxy from a `Config` and serving it: the listener, one HTTP/1.1 connection
//! task per client, and graceful shutdown. Tests start it in-process on `127.0.0.1:0`.

use crate::cache::{store::Store, Cache};
use crate::config::Config;
use crate::origin::Origin;
use crate::proxy::{ProxyService, Shared};
use crate::rules::Rules;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the cache directory: {0}")]
    Store(#[from] crate::cache::store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// A running proxy.
pub struct RunningProxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningProxy {
    /// Opens the store, binds the listener and starts serving.
    pub async fn start(config: Config) -> Result<RunningProxy, StartError> {
        let store = Store::open(config.cache_dir.clone()).await?;
        let origin = Origin::new(config.origin.clone());
        let shared = Arc::new(Shared {
            rules: Rules::new(config.rules.clone()),
            cache: Cache::new(store, origin.clone(), config.fill.clone()),
            origin,
        });
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared.clone(), config.header_read_timeout, stopped));
        tracing::info!(listen = %local_addr, origin = %config.origin.authority, cache_dir = %config.cache_dir.display(), "lotecache serving");
        Ok(RunningProxy { local_addr, shared, stop, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The store (tests and tools inspect it).
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.cache.store
    }

    /// The cache: store and fills in flight.
    pub fn cache(&self) -> &Cache {
        &self.shared.cache
    }

    /// Stops accepting, lets open connections finish their responses for up to `grace`.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            tracing::warn!(?grace, "connections still open after the grace period; closing them");
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    header_read_timeout: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(true);
    loop {
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
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(ProxyService::new(shared.clone(), peer));
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}
