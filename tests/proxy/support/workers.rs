//! Worker runtimes for an in-process proxy, as `lotecache serve` runs them
//! (`server.workers`): one single-threaded runtime per thread, each with its own origin pool
//! slot. `RunningProxy::start` alone serves every connection on the caller's runtime; pass
//! [`WorkerThreads::handles`] to `RunningProxy::start_with_workers` instead.

use std::thread::JoinHandle;
use tokio::sync::watch;

pub struct WorkerThreads {
    pub handles: lotecache::server::Workers,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerThreads {
    pub fn start(count: usize) -> WorkerThreads {
        let (stop, stopped) = watch::channel(false);
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for slot in 1..=count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("worker runtime");
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("test-worker-{slot}"))
                    .spawn(move || {
                        lotecache::upstream::use_pool_slot(slot);
                        runtime.block_on(async move {
                            let _ = stopped.wait_for(|stop| *stop).await;
                        });
                        // Dropping the runtime here drops every task still on it: its
                        // connections and fills end where they are, as in a killed process.
                    })
                    .expect("worker thread"),
            );
        }
        WorkerThreads { handles: handles.into(), stop, threads }
    }

    /// Ends the worker runtimes, dropping whatever runs on them, and waits for their threads.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let threads = self.threads;
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await
        .expect("joining worker threads");
    }
}
