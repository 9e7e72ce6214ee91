//! How runtime workers share the machine's cores with everything else on it: each worker can be
//! pinned to a core of its own, and a busy worker hands its core over now and then.
//!
//! Yielding: a worker that always has a request waiting never blocks, so the kernel moves it
//! off its core only when its slice runs out, noticed at a scheduler tick (4 ms at HZ=250);
//! every other runnable thread queued on that core — the origin, the clients, the other
//! services of a small machine — waits that long. On the 2-core bench, with the load generator
//! sharing the cores, that tick was the generator's p99 (4.3 ms) in every saturated 4 KB run. So
//! a worker that starts a request `server.yield_interval` or more after it last gave its core
//! away — by yielding, or by sleeping while idle ([`unparked`]) — calls `sched_yield` first: the
//! same runs then mostly showed ~1 ms. A worker that sleeps between requests never yields (it
//! used to, on every request of a quiet proxy, handing its core to whatever else was runnable
//! while a client waited). Going idle is not enough: under load a worker's park mostly finds
//! events waiting and returns without leaving the core; only one that slept counts.
//!
//! Pinning (`server.pin_workers`): yielding only helps when another thread shares the worker's
//! core. Left to the kernel, the workers sometimes share one core while two other busy threads
//! share the other, and stay so; one worker per core rules that out. A worker is pinned to the
//! next allowed core when it serves its first request (only workers serve requests); threads it
//! starts later (tokio's blocking pool) would inherit that mask, so every new runtime thread
//! first takes back the process's original mask.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

thread_local! {
    /// When this thread last yielded, slept (or first checked in).
    static LAST_YIELD: Cell<Option<Instant>> = const { Cell::new(None) };
    /// When this thread went idle, until it wakes.
    static PARKED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Whether workers pin themselves; set once at start-up.
static PIN_WORKERS: AtomicBool = AtomicBool::new(false);
/// The cores the process may run on, as found at start-up (before any pinning).
static ALLOWED_CORES: OnceLock<Vec<usize>> = OnceLock::new();
/// The next worker's index into `ALLOWED_CORES`.
static NEXT_CORE: AtomicUsize = AtomicUsize::new(0);

/// Called by a worker as it starts a request (`now`): yields the thread if its last yield is
/// `interval` or more ago. Returns whether it yielded. A zero interval never yields.
pub fn checkpoint(interval: Duration, now: Instant) -> bool {
    LAST_YIELD.with(|last| match last.get() {
        Some(_) if interval.is_zero() => false,
        Some(at) if now.saturating_duration_since(at) < interval => false,
        Some(_) => {
            std::thread::yield_now();
            last.set(Some(Instant::now()));
            true
        }
        None => {
            // This thread's first request: it is a worker.
            if PIN_WORKERS.load(Ordering::Relaxed) {
                pin_this_thread_to_next_core();
            }
            last.set(Some(now));
            false
        }
    })
}

/// A park at least this long blocked: the thread slept, and its core ran something else. A park
/// that finds events waiting returns in a microsecond or two without leaving the core.
const SLEPT: Duration = Duration::from_micros(50);

/// The runtime's `on_thread_park` hook: notes when the worker went idle.
pub fn parked() {
    PARKED_AT.with(|at| at.set(Some(Instant::now())));
}

/// The runtime's `on_thread_unpark` hook: a worker that slept gave its core away, which
/// restarts its yield clock (one that only polled ready events did not: under load that is
/// most parks). A thread that has not served a request yet is left alone: its first request
/// pins it.
pub fn unparked() {
    let Some(at) = PARKED_AT.with(|p| p.take()) else { return };
    let now = Instant::now();
    if now.saturating_duration_since(at) >= SLEPT {
        LAST_YIELD.with(|last| {
            if last.get().is_some() {
                last.set(Some(now));
            }
        });
    }
}

/// Makes workers pin themselves (`server.pin_workers`). Call before the runtime starts, from
/// the main thread, whose mask is the process's.
pub fn enable_pinning() {
    ALLOWED_CORES.get_or_init(current_cores);
    PIN_WORKERS.store(true, Ordering::Relaxed);
}

/// The runtime's `on_thread_start` hook: a thread started by a pinned worker gets the
/// process's original mask back.
pub fn on_thread_start() {
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
    fn a_thread_yields_once_per_interval() {
        let interval = Duration::from_millis(50);
        let t0 = Instant::now();
        // Each test runs on its own thread: the first check-in starts the clock.
        assert!(!checkpoint(interval, t0));
        assert!(!checkpoint(interval, t0 + Duration::from_millis(49)));
        assert!(checkpoint(interval, t0 + Duration::from_millis(50)));
        // The clock restarted at the yield (now, not t0 + 50 ms).
        assert!(!checkpoint(interval, Instant::now()));
    }

    #[test]
    fn a_worker_that_slept_does_not_yield_and_one_that_only_polled_does() {
        let interval = Duration::from_millis(50);
        let t0 = Instant::now();
        parked();
        unparked(); // before the first request: nothing to restart
        assert!(!checkpoint(interval, t0));
        std::thread::sleep(Duration::from_millis(60));
        parked();
        std::thread::sleep(SLEPT * 2);
        unparked();
        assert!(!checkpoint(interval, Instant::now()), "it slept just now");
        std::thread::sleep(Duration::from_millis(60));
        parked();
        unparked(); // a park that found events waiting
        assert!(checkpoint(interval, Instant::now()), "busy for 60 ms: it yields");
    }

    #[test]
    fn a_zero_interval_never_yields() {
        let t0 = Instant::now();
        assert!(!checkpoint(Duration::ZERO, t0));
        assert!(!checkpoint(Duration::ZERO, t0 + Duration::from_secs(3600)));
    }

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
}
