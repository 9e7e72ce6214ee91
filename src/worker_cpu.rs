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
//! Slice (`server.worker_slice`): when it serves its first request, a worker asks the kernel
//! (EEVDF, Linux 6.12 and later) for a short scheduling slice, which gives it an early
//! deadline: a thread woken on its core then seldom preempts it. That matters on the
//! pass-through path. Connecting to gunicorn wakes every one of its idle sync workers (they all
//! wait on the listening socket); when the kernel woke one on our core, it ran its `accept`
//! (which another worker won) before us, ~130 µs between our connect and the write of the
//! request. A tracepoint trace of the Monitoring page, one request at a time, showed that in
//! 56 % of lotecache's requests and 21 % of nginx's. With a 100 µs slice the hop was 5–45 µs
//! shorter than that of the same build with the slice off, beside it in four interleaved runs,
//! and about nginx's; 500 µs did as well (16–86 µs in three runs). 100 µs cost 16 MB hits
//! ~10 % of their rate (more preemption in the middle of long `sendfile`s); 500 µs did not
//! (three oha runs each, beside the slice off), so that is the default. Older kernels are not
//! asked.
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
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
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
/// The slice workers ask for, in ns (0: none); set once at start-up.
static WORKER_SLICE_NS: AtomicU64 = AtomicU64::new(0);

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
            let slice = Duration::from_nanos(WORKER_SLICE_NS.load(Ordering::Relaxed));
            if !slice.is_zero() && kernel_takes_slices() && !request_slice(slice) {
                tracing::warn!(?slice, "the kernel refused a worker's scheduling slice; it keeps the default");
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

/// `struct sched_attr` of `sched_setattr(2)`; libc does not define it.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    /// For SCHED_OTHER and SCHED_BATCH threads, the slice they ask for (Linux 6.12+).
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks the kernel to run this thread `slice` at a time (see the module doc), keeping its
/// policy and nice value. False when the thread's policy has no slices (real-time) or the kernel
/// refused. Before Linux 6.12 an ordinary thread has no slice of its own to set: see
/// [`kernel_takes_slices`].
pub fn request_slice(slice: Duration) -> bool {
    // SAFETY: plain syscalls on the calling thread; `attr` lives across the call and its
    // `size` field says how much of it the kernel may read.
    unsafe {
        let policy = libc::sched_getscheduler(0);
        if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
            return false;
        }
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            return false;
        }
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy: policy as u32,
            nice,
            runtime: slice.as_nanos() as u64,
            ..SchedAttr::default()
        };
        libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) == 0
    }
}

/// Whether the running kernel takes a slice request from an ordinary thread (Linux 6.12 and
/// later).
pub fn kernel_takes_slices() -> bool {
    static TAKES: OnceLock<bool> = OnceLock::new();
    *TAKES.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (6, 12)
    })
}

/// Makes workers ask for `slice` (`server.worker_slice`; zero: they do not). Call before the
/// runtime starts.
pub fn use_slice(slice: Duration) {
    WORKER_SLICE_NS.store(slice.as_nanos() as u64, Ordering::Relaxed);
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

    /// This thread's slice as the kernel reports it (`se.slice` in its sched file), in ns.
    fn reported_slice() -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    }

    #[test]
    fn a_thread_gets_the_slice_it_asks_for_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: plain syscalls on this thread.
            let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) }, 0);
            assert!(request_slice(Duration::from_micros(300)));
            assert_eq!(nice(), 3, "the nice value is kept");
            if kernel_takes_slices() {
                if let Some(slice) = reported_slice() {
                    assert_eq!(slice, 300_000);
                }
            }
        })
        .join()
        .unwrap();
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
