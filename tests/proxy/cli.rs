//! The `lotecache` binary: `check-config`, and `serve` with flags in front of an origin.

use crate::support::process::{serve, BIN};
use crate::support::{batch, get, origin::*};
use std::process::Command;

#[test]
fn check_config_accepts_the_shipped_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/lotecache.toml");
    let out = Command::new(BIN).args(["check-config", path]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
}

#[test]
fn check_config_prints_every_error_with_its_location_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = \"x\"\n[origin]\nurl = \"ftp://o\"\n").unwrap();
    let out = Command::new(BIN).args(["check-config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2:10: server.listen:"), "{err}");
    assert!(err.contains("bad.toml:4:7: origin.url:"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
}

#[tokio::test]
async fn serve_with_flags_shows_one_generation_a_hit_and_a_hit_after_restart() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = serve(origin.addr, dir.path(), &[]).await;
    let addr = server.addr();
    let first = get(addr, &batch("S-1")).await;
    let second = get(addr, &batch("S-1")).await;
    assert_eq!(second.cache_status(), "lotecache; hit");
    assert_eq!(first.bytes(), second.bytes());
    assert_eq!(origin.generations("S-1"), 1);
    drop(server);

    let server = serve(origin.addr, dir.path(), &[]).await;
    let third = get(server.addr(), &batch("S-1")).await;
    assert_eq!(third.cache_status(), "lotecache; hit");
    assert_eq!(third.bytes(), first.bytes());
    assert_eq!(origin.generations("S-1"), 1);
}

/// The `se.slice` the kernel reports for each of `pid`'s threads named `tokio-rt-worker`, in
/// ns; empty where the kernel does not report slices.
fn worker_slices(pid: u32) -> Vec<u64> {
    let mut slices = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let sched = std::fs::read_to_string(task.path().join("sched")).unwrap_or_default();
        let slice = sched.lines().find(|l| l.starts_with("se.slice")).and_then(|l| l.rsplit(':').next());
        if let (true, Some(slice)) = (comm.trim() == "tokio-rt-worker", slice) {
            slices.push(slice.trim().parse().unwrap());
        }
    }
    slices
}

#[tokio::test]
async fn serve_workers_run_with_the_configured_scheduling_slice() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let off = dir.path().join("off.toml");
    std::fs::write(&off, "[server]\nworker_slice = \"off\"\n").unwrap();
    for (extra, expected) in [(vec![], true), (vec!["--config", off.to_str().unwrap()], false)] {
        let cache = tempfile::tempdir().unwrap();
        let server = serve(origin.addr, cache.path(), &extra).await;
        // A worker asks for its slice when it serves its first request; two workers or more
        // each get connections in turn.
        for _ in 0..8 {
            assert_eq!(get(server.addr(), "/api/ping").await.status, http::StatusCode::OK);
        }
        let slices = worker_slices(server.pid());
        if !lotecache::worker_cpu::kernel_takes_slices() || slices.is_empty() {
            return;
        }
        let asked = slices.iter().filter(|&&s| s == 500_000).count();
        if expected {
            assert!(asked >= 1, "a worker runs with a 500 µs slice: {slices:?}");
        } else {
            assert_eq!(asked, 0, "worker_slice = \"off\" leaves the kernel's slice: {slices:?}");
        }
    }
}
