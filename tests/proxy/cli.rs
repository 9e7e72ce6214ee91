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
