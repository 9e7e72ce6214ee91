//! The `lotecache` binary: `check-config`, and `serve` with flags in front of an origin.

use crate::support::{batch, get, origin::*};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_lotecache");

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn serve(port: u16, origin: std::net::SocketAddr, dir: &std::path::Path) -> Serve {
    let server = Serve(
        Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--origin", &format!("http://{origin}")])
            .args(["--cache-dir", dir.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("lotecache serve did not start listening");
}

#[tokio::test]
async fn serve_with_flags_shows_one_generation_a_hit_and_a_hit_after_restart() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let server = serve(port, origin.addr, dir.path()).await;
    let first = get(addr, &batch("S-1")).await;
    let second = get(addr, &batch("S-1")).await;
    assert_eq!(second.cache_status(), "lotecache; hit");
    assert_eq!(first.bytes(), second.bytes());
    assert_eq!(origin.generations("S-1"), 1);
    drop(server);

    let _server = serve(port, origin.addr, dir.path()).await;
    let third = get(addr, &batch("S-1")).await;
    assert_eq!(third.cache_status(), "lotecache; hit");
    assert_eq!(third.bytes(), first.bytes());
    assert_eq!(origin.generations("S-1"), 1);
}
