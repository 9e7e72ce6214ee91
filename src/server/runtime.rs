//! The threads requests run on: one single-threaded tokio runtime per worker thread
//! (`server.workers`, one per core by default), each given connections in turn, so a request
//! runs start to end on the thread that took its connection — no task moves between threads, no
//! thread wakes another: nginx's worker model. The runtime that starts the proxy accepts, and
//! runs the admin listener and the background loops.
//!
//! Pinning (`server.pin_workers`, off by default): each worker thread is pinned to a core of its
//! own, as nginx's `worker_cpu_affinity` does. Threads a pinned worker starts later (tokio's
//! blocking pool) would inherit its mask, so every new runtime thread first takes back the
//! process's original mask.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, OnceLock,
};
use tokio::sync::watch;

/// The runtimes connections are served on, one per worker thread, given connections in turn.
/// Empty: the runtime that accepts them serves them.
pub type Workers = Arc<[tokio::runtime::Handle]>;

/// The name of every runtime thread (operators find the workers by it in `top -H`).
const THREAD_NAME: &str = "tokio-rt-worker";

/// How many workers `server.workers` asks for: 0 means one per core the process may use.
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// A runtime builder with what every runtime thread of the process needs: its name, and, when
/// workers are pinned, the process's core mask back for threads a pinned worker starts.
pub fn runtime_builder(mut builder: tokio::runtime::Builder, pin_workers: bool) -> tokio::runtime::Builder {
    builder.enable_all().thread_name(THREAD_NAME);
    if pin_workers {
        enable_pinning();
        builder.on_thread_start(on_thread_start);
    }
    builder
}

/// The worker threads, each running a single-threaded runtime until stopped. Dropping this
/// stops them without waiting: whatever still runs on them is dropped where it is.
pub struct WorkerThreads {
    handles: Workers,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl WorkerThreads {
    /// Starts `count` workers; each takes origin-pool slot 1, 2, … (see [`crate::pool`]).
    pub fn start(count: usize, pin_workers: bool) -> WorkerThreads {
        let (stop, stopped) = watch::channel(false);
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for slot in 1..=count {
            let runtime = runtime_builder(tokio::runtime::Builder::new_current_thread(), pin_workers)
                .build()
                .expect("worker runtime");
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            let thread = std::thread::Builder::new().name(THREAD_NAME.into()).spawn(move || {
                if pin_workers {
                    pin_this_thread_to_next_core();
                }
                crate::pool::use_pool_slot(slot);
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stopped.wait_for(|stop| *stop) => {}
                        _ = keep_a_timer_set() => {}
                    }
                });
                // Dropping the runtime drops every task still on it.
            });
            threads.push(thread.expect("worker thread"));
        }
        WorkerThreads { handles: handles.into(), stop, threads }
    }

    /// The workers' runtimes.
    pub fn handles(&self) -> Workers {
        self.handles.clone()
    }

    /// Ends the worker runtimes and waits for their threads (off the async threads).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for WorkerThreads {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
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

/// The cores the process may run on, as found before any pinning.
static ALLOWED_CORES: OnceLock<Vec<usize>> = OnceLock::new();
/// The next worker's index into `ALLOWED_CORES`.
static NEXT_CORE: AtomicUsize = AtomicUsize::new(0);

/// Notes the process's cores, once, before any thread is pinned (called from the thread that
/// builds the runtimes, whose mask is the process's).
fn enable_pinning() {
    ALLOWED_CORES.get_or_init(current_cores);
}

/// The runtimes' `on_thread_start` hook: a thread started by a pinned worker gets the
/// process's original mask back.
fn on_thread_start() {
    if let Some(cores) = ALLOWED_CORES.get() {
        set_cores(cores);
    }
}

fn pin_this_thread_to_next_core() {
    let Some(cores) = ALLOWED_CORES.get().filter(|c| !c.is_empty()) else { return };
    let core = cores[NEXT_CORE.fetch_add(1, Ordering::Relaxed) % cores.len()];
    if set_cores(&[core]) {
        tracing::debug!(core, "worker pinned");
    } else {
        tracing::warn!(core, "could not pin a worker to its core; it runs unpinned");
    }
}

/// The cores this thread may run on.
fn current_cores() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Restricts this thread to `cores`; false if the kernel refused.
fn set_cores(cores: &[usize]) -> bool {
    // SAFETY: as above; every core came from sched_getaffinity, so is below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cores {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_mask_round_trips_through_set_cores() {
        let cores = current_cores();
        assert!(!cores.is_empty());
        std::thread::spawn(move || {
            assert!(set_cores(&cores[..1]));
            assert_eq!(current_cores(), cores[..1].to_vec());
            assert!(set_cores(&cores));
            assert_eq!(current_cores(), cores);
        })
        .join()
        .unwrap();
    }

    #[tokio::test]
    async fn workers_run_on_threads_of_their_own_and_stop_when_asked() {
        let workers = WorkerThreads::start(2, false);
        let here = std::thread::current().id();
        for handle in workers.handles().iter() {
            let there = handle.spawn(async { std::thread::current().id() }).await.unwrap();
            assert_ne!(there, here);
        }
        workers.stop().await;
    }
}
