//! Hands a busy runtime worker's core to the machine's other runnable threads now and then.
//!
//! A worker that always has a request waiting never blocks, so the kernel moves it off its
//! core only when its slice runs out, noticed at a scheduler tick (4 ms at HZ=250); every other
//! runnable thread queued on that core — the origin, the clients, the other services of a small
//! machine — waits that long. On the 2-core bench, with the load generator sharing the cores,
//! that tick was the generator's p99 (4.3 ms) in every saturated 4 KB run. So a worker that
//! starts a request `server.yield_interval` or more after its last yield calls `sched_yield`
//! first: the same runs then mostly showed ~1 ms. With nothing else runnable on its core the
//! call returns at once (well under a microsecond), so an idle machine pays nothing noticeable.

use std::{
    cell::Cell,
    time::{Duration, Instant},
};

thread_local! {
    /// When this thread last yielded (or first checked in).
    static LAST_YIELD: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Called by a worker as it starts a request (`now`): yields the thread if its last yield is
/// `interval` or more ago. Returns whether it yielded. A zero interval never yields.
pub fn checkpoint(interval: Duration, now: Instant) -> bool {
    if interval.is_zero() {
        return false;
    }
    LAST_YIELD.with(|last| match last.get() {
        Some(at) if now.saturating_duration_since(at) < interval => false,
        Some(_) => {
            std::thread::yield_now();
            last.set(Some(Instant::now()));
            true
        }
        None => {
            last.set(Some(now));
            false
        }
    })
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
    fn a_zero_interval_never_yields() {
        let t0 = Instant::now();
        assert!(!checkpoint(Duration::ZERO, t0));
        assert!(!checkpoint(Duration::ZERO, t0 + Duration::from_secs(3600)));
    }
}
